"""Hungarian matching of CellFinder's queries to the true cells of one image.

DETR has no anchors-to-objects rule: each true cell is assigned the one query that would cost least to
make it, over all one-to-one assignments, and every other query must say "no cell". The cost mixes the
focal classification cost with the L1 and GIoU box costs, with Anchor-DETR's default weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from cellsam_ray.train.box_ops import cxcywh_to_xyxy, generalized_box_iou

CELL_CLASS = 0
"""The class index CellFinder's cells are trained on; any other class is trained to stay off."""


@dataclass(frozen=True)
class MatchCosts:
    """Weights of the matching cost terms (Anchor-DETR's ``set_cost_*`` defaults)."""

    classification: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    anchor: float = 0.0
    """Weight of the L1 distance from a query's anchor point to the cell's centre (0: DETR's plain cost).

    Not in Anchor-DETR. With anchors on a (frozen) grid it makes the query whose anchor is nearest a cell
    the one that must find it, so which query answers for a cell stops changing from step to step with
    the predictions, as it does under the plain cost early in training."""


@torch.no_grad()
def hungarian_match(
    logits: Tensor, boxes: Tensor, target_boxes: Tensor, costs: MatchCosts = MatchCosts(),
    anchors: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(query indices, target indices) of the cheapest one-to-one assignment, sorted by query.

    ``logits`` (Q, C) and ``boxes`` (Q, 4) cxcywh are one image's predictions; ``target_boxes`` (N, 4)
    cxcywh its true cells, all normalised to [0, 1]. With N > Q only Q cells are matched. ``anchors``
    (Q, 2) are the queries' anchor points (x, y), used when ``costs.anchor`` is set.
    """
    if len(target_boxes) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    p = logits[:, CELL_CLASS].float().sigmoid()
    alpha, gamma = costs.focal_alpha, costs.focal_gamma
    positive = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    negative = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
    cost = costs.classification * (positive - negative)[:, None]
    cost = cost + costs.l1 * torch.cdist(boxes.float(), target_boxes.float(), p=1)
    cost = cost - costs.giou * generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(target_boxes.float()))
    if costs.anchor:
        if anchors is None:
            raise ValueError("an anchor cost needs the queries' anchor points")
        cost = cost + costs.anchor * torch.cdist(anchors.float(), target_boxes[:, :2].float(), p=1)
    queries, targets = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(queries, dtype=torch.int64), torch.as_tensor(targets, dtype=torch.int64)
