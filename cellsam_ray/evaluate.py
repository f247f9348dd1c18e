"""The paper's metric: F1 at IoU 0.5 between predicted and true cells, with precision, recall, mean IoU.

Cells match when their IoU exceeds the threshold; above 0.5 a cell can match at most one other, so no
assignment problem arises (``threshold`` must stay ≥ 0.5). F1 = TP / (TP + (FP + FN) / 2), as CellSAM's
evaluation computes it. Label images are read block by block and only the overlap counts of label pairs
are kept, so slides of any size can be scored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Score:
    f1: float
    precision: float
    recall: float
    mean_iou: float  # over matched cells
    true_positives: int
    predicted: int
    true: int

    def as_dict(self) -> dict:
        return asdict(self)


class PairCounts:
    """Pixel counts of every (predicted, true) label pair and of each label, accumulated block by block."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[int, int], int] = {}
        self.pred_area: dict[int, int] = {}
        self.true_area: dict[int, int] = {}

    def add(self, pred: np.ndarray, true: np.ndarray) -> None:
        if pred.shape != true.shape:
            raise ValueError(f"label images differ in shape: {pred.shape} vs {true.shape}")
        p, t = pred.ravel().astype(np.int64), true.ravel().astype(np.int64)
        for counts, values in ((self.pred_area, p[p > 0]), (self.true_area, t[t > 0])):
            ids, n = np.unique(values, return_counts=True)
            for i, c in zip(ids.tolist(), n.tolist()):
                counts[i] = counts.get(i, 0) + c
        both = (p > 0) & (t > 0)
        pairs, n = np.unique(np.stack([p[both], t[both]]), axis=1, return_counts=True)
        for (a, b), c in zip(pairs.T.tolist(), n.tolist()):
            self.pairs[(a, b)] = self.pairs.get((a, b), 0) + c

    def score(self, threshold: float = 0.5) -> Score:
        if threshold < 0.5:
            raise ValueError("matching is one-to-one only for IoU thresholds of at least 0.5")
        ious = []
        for (a, b), inter in self.pairs.items():
            iou = inter / (self.pred_area[a] + self.true_area[b] - inter)
            if iou > threshold:
                ious.append(iou)
        tp, n_pred, n_true = len(ious), len(self.pred_area), len(self.true_area)
        fp, fn = n_pred - tp, n_true - tp
        return Score(
            f1=tp / (tp + 0.5 * (fp + fn)) if (tp + fp + fn) else 1.0,
            precision=tp / n_pred if n_pred else 1.0,
            recall=tp / n_true if n_true else 1.0,
            mean_iou=float(np.mean(ious)) if ious else 0.0,
            true_positives=tp,
            predicted=n_pred,
            true=n_true,
        )


def score_arrays(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> Score:
    counts = PairCounts()
    counts.add(np.asarray(pred), np.asarray(true))
    return counts.score(threshold)


def score_zarr(pred, true, *, block: int = 2048, threshold: float = 0.5) -> Score:
    """Score two 2-D label arrays (zarr or numpy) block by block."""
    if tuple(pred.shape) != tuple(true.shape):
        raise ValueError(f"label images differ in shape: {pred.shape} vs {true.shape}")
    counts = PairCounts()
    h, w = pred.shape[-2:]
    for y in range(0, h, block):
        for x in range(0, w, block):
            counts.add(np.asarray(pred[..., y : y + block, x : x + block]),
                       np.asarray(true[..., y : y + block, x : x + block]))
    return counts.score(threshold)


def label_agreement(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """The golden label tolerance: (fraction of pixels equal once each actual id is mapped to its
    best-overlapping expected id, worst IoU of an expected cell with its best-matching actual cell)."""
    n_act, n_exp = int(actual.max()) + 1, int(expected.max()) + 1
    overlap = np.bincount(actual.ravel() * n_exp + expected.ravel(), minlength=n_act * n_exp).reshape(n_act, n_exp)
    mapping = overlap.argmax(axis=1)
    mapping[0] = 0
    agree = float(np.mean(mapping[actual] == expected))
    iou = overlap / (overlap.sum(axis=1)[:, None] + overlap.sum(axis=0)[None, :] - overlap)
    return agree, float(iou[1:, 1:].max(axis=0).min()) if n_exp > 1 else 1.0
