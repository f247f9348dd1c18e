"""How well a model segments labelled tiles, measured through the inference code itself.

Each tile goes through ``segment_tile_reference`` (the published per-tile pipeline, the yardstick the
faster mode is held to) exactly as the whole-slide pipeline sends a window (normalisation already
done), and the F1 at IoU 0.5 is pooled over tiles: true positives, predictions and true cells are
summed before the ratio, so a tile with many cells counts for more than an empty one. True cells
smaller than inference's minimum object size (slivers cut by the tile's edge) are not counted: no
model output can match them, and across a slide the neighbouring tile sees those cells whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cellsam_ray.evaluate import PairCounts, Score
from cellsam_ray.model.network import CellSAM
from cellsam_ray.model.postprocess import MIN_SIZE
from cellsam_ray.model.reference import segment_tile_reference
from cellsam_ray.train.data import LabelledImage


def score_tiles(net: CellSAM, items: Sequence[LabelledImage], *, bbox_threshold: float = 0.4,
                device: str | torch.device = "cpu") -> Score:
    """The pooled F1, precision, recall and mean IoU of ``net`` on ``items``."""
    was_training = net.training
    net.eval()
    results = [segment_tile_reference(item.image, net, normalize=False, bbox_threshold=bbox_threshold,
                                      device=device) for item in items]
    net.train(was_training)
    tp = predicted = true = 0
    iou_sum = 0.0
    for item, result in zip(items, results):
        counts = PairCounts()
        counts.add(result.labels, _without_slivers(item.labels))
        score = counts.score()
        tp, predicted, true = tp + score.true_positives, predicted + score.predicted, true + score.true
        iou_sum += score.mean_iou * score.true_positives
    return Score(
        f1=2 * tp / (predicted + true) if predicted + true else 1.0,
        precision=tp / predicted if predicted else 1.0,
        recall=tp / true if true else 1.0,
        mean_iou=iou_sum / tp if tp else 0.0,
        true_positives=tp,
        predicted=predicted,
        true=true,
    )


def _without_slivers(labels: np.ndarray) -> np.ndarray:
    areas = np.bincount(labels.ravel())
    return np.where(areas[labels] >= MIN_SIZE, labels, 0)
