"""The training objective: DETR's set loss for CellFinder and a box-prompted mask loss for SAM.

Detection (per decoder layer, against that layer's own Hungarian matching):

- classification: sigmoid focal loss over every (query, class) pair, summed and divided by the number of
  true cells, so a crowded tile weighs no more per cell than a sparse one;
- boxes: L1 on normalised (cx, cy, w, h) plus 1 − GIoU, over the matched pairs, also per true cell.

Masks (SAM prompted with true, slightly jittered boxes): binary cross-entropy plus Dice on the mask
logits at model resolution, and the squared error of SAM's predicted IoU against the IoU its thresholded
mask really has; inference drops masks whose predicted IoU is below 0.5, so that head must be trained.
A cell covers a fraction of a percent of a tile, so a cross-entropy averaged over the tile alone is won
by predicting no cell anywhere (measured: the masks stayed empty for the first hundred steps); the
cross-entropy is therefore averaged over the tile *and* over the region around the prompt box, and Dice
is taken in that region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cellsam_ray.model.reference import MASK_THRESHOLD
from cellsam_ray.train.box_ops import cxcywh_to_xyxy, generalized_box_iou
from cellsam_ray.train.matcher import CELL_CLASS


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; detection ones are Anchor-DETR's ``*_loss_coef`` defaults."""

    classification: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    mask_bce: float = 1.0
    mask_dice: float = 1.0
    mask_iou: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss: cross-entropy scaled by (1 − p_t)^gamma, positives weighted by alpha.

    Easy negatives (the hundreds of queries on background) contribute almost nothing, so the few
    matched queries are not drowned out.
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return weight * ce * (1 - p_t) ** gamma


def detection_losses(
    logits: Tensor,
    boxes: Tensor,
    targets: list[Tensor],
    matches: list[tuple[Tensor, Tensor]],
    num_cells: float,
    weights: LossWeights = LossWeights(),
) -> dict[str, Tensor]:
    """Unweighted classification, L1 and GIoU losses of one decoder layer for a batch.

    ``logits`` (B, Q, C), ``boxes`` (B, Q, 4) cxcywh; ``targets[b]`` (N_b, 4) cxcywh; ``matches[b]`` the
    (query, target) indices of image b; ``num_cells`` the number of true cells the sums are divided by
    (across all data-parallel workers, at least 1).
    """
    onehot = torch.zeros_like(logits)
    batch_index = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)])
    query_index = torch.cat([q for q, _ in matches])
    onehot[batch_index, query_index, CELL_CLASS] = 1.0
    classification = sigmoid_focal_loss(logits, onehot, weights.focal_alpha, weights.focal_gamma).sum() / num_cells

    predicted = boxes[batch_index, query_index]
    true = torch.cat([t[j] for t, (_, j) in zip(targets, matches)]).to(predicted)
    l1 = (predicted - true).abs().sum() / num_cells
    giou = (1 - torch.diagonal(generalized_box_iou(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(true)))).sum() / num_cells
    return {"classification": classification, "l1": l1, "giou": giou}


def mask_losses(mask_logits: Tensor, true_masks: Tensor, predicted_iou: Tensor, regions: Tensor) -> dict[str, Tensor]:
    """BCE, Dice and IoU-head losses, each averaged over masks.

    ``mask_logits`` (K, H, W) at model resolution, ``true_masks`` (K, H, W) in {0, 1}, ``predicted_iou``
    (K,) SAM's IoU estimate for each mask, ``regions`` (K, H, W) bool: where each cell is looked for
    (see ``box_regions``).
    """
    true_masks = true_masks.to(mask_logits)
    regions = regions.to(mask_logits)
    pixel_bce = F.binary_cross_entropy_with_logits(mask_logits, true_masks, reduction="none")
    near = (pixel_bce * regions).sum((1, 2)) / regions.sum((1, 2)).clamp(min=1)
    bce = pixel_bce.mean((1, 2)) + near
    p = (mask_logits.sigmoid() * regions).flatten(1)
    t = (true_masks * regions).flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    with torch.no_grad():
        binary = (mask_logits.sigmoid() > MASK_THRESHOLD).flatten(1).to(t)
        inter = (binary * t).sum(1)
        actual_iou = inter / (binary.sum(1) + t.sum(1) - inter).clamp(min=1)
    iou = (predicted_iou - actual_iou) ** 2
    return {"mask_bce": bce.mean(), "mask_dice": dice.mean(), "mask_iou": iou.mean()}


def box_regions(boxes: Tensor, size: int, margin: float = 0.5) -> Tensor:
    """(K, size, size) bool: each xyxy box grown by ``margin`` of its width/height on every side."""
    grow = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) * margin
    x1, y1, x2, y2 = (boxes + grow * torch.tensor([-1, -1, 1, 1], device=boxes.device)).unbind(-1)
    centres = torch.arange(size, device=boxes.device) + 0.5
    inside_x = (centres[None] >= x1[:, None]) & (centres[None] <= x2[:, None])
    inside_y = (centres[None] >= y1[:, None]) & (centres[None] <= y2[:, None])
    return inside_y[:, :, None] & inside_x[:, None, :]
