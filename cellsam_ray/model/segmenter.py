"""CellSAM behind the segmenter contract (``cellsam_ray.segmenter``), for the whole-slide pipeline.

A window arrives as the slide-normalised (nuclear, whole-cell) channels; CellSAM takes channels
(blank, nuclear, whole-cell), so the window is laid out that way with the library normalisation off
(the slide-wide one already ran: per-tile statistics would make the two sides of a seam disagree).
Each tile's answer is CellSAM's own per-tile label image, after its hole filling and small-object
removal, handed to the merge as one mask per cell.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from cellsam_ray.model.fast import segment_tiles_fast
from cellsam_ray.model.reference import TileSegmentation, segment_tile_reference
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.spec import SegmentSpec


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class CellSAMSegmenter:
    def __init__(self, model, *, mode: str = "fast", device: str = "cpu", bbox_threshold: float = 0.4,
                 batch_size: int = 4) -> None:
        self.model = model
        self.mode = mode
        self.device = device
        self.bbox_threshold = bbox_threshold
        self.batch_size = batch_size

    @classmethod
    def from_spec(cls, spec: SegmentSpec) -> "CellSAMSegmenter":
        device = resolve_device(spec.device)
        model = load_cellsam(spec.weights, spec.model_config_name, device=device,
                             storage_options=spec.storage.options(), sha256=spec.weights_sha256)
        return cls(model, mode=spec.mode, device=device, bbox_threshold=spec.bbox_threshold,
                   batch_size=spec.batch_size)

    def segment(self, window: np.ndarray, *, origin: tuple[int, int]) -> dict[str, Any]:
        return self.segment_batch([window], origins=[origin])[0]

    def segment_batch(self, windows: list[np.ndarray], *, origins: list[tuple[int, int]]) -> list[dict[str, Any]]:
        images = [cellsam_layout(w) for w in windows]
        options = dict(normalize=False, bbox_threshold=self.bbox_threshold, device=self.device)
        if self.mode == "fast":
            tiles = segment_tiles_fast(images, self.model, tile_batch=self.batch_size, **options)
        else:
            tiles = [segment_tile_reference(image, self.model, **options) for image in images]
        return [cells_of(tile) for tile in tiles]


def cellsam_layout(window: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in CellSAM's channel order (blank, nuclear, whole-cell) from (roles, H, W)."""
    image = np.zeros(window.shape[1:] + (3,), dtype=np.float32)
    image[..., 1] = window[0]
    if len(window) > 1:
        image[..., 2] = window[1]
    return image


def cells_of(tile: TileSegmentation) -> dict[str, Any]:
    """The contract's boxes, scores, ious and masks for each cell of a tile's label image.

    A cell's box is its mask's extent. Its score and predicted IoU are those of the painted box that
    matches it best (cleanup renumbers the labels, so the rows of ``tile.boxes`` are not label ids).
    """
    boxes, scores, ious, masks = [], [], [], []
    for index, found in enumerate(ndimage.find_objects(tile.labels)):
        if found is None:
            continue
        rows, cols = found
        box = np.array([cols.start, rows.start, cols.stop, rows.stop], dtype=np.float64)
        best = _best_match(box, tile.boxes)
        boxes.append(box)
        scores.append(float(tile.scores[best]) if best is not None else 0.0)
        ious.append(float(tile.ious[best]) if best is not None else 0.0)
        masks.append(tile.labels[rows, cols] == index + 1)
    return {"boxes": np.array(boxes).reshape(-1, 4), "scores": np.array(scores), "ious": np.array(ious),
            "masks": masks}


def _best_match(box: np.ndarray, candidates: np.ndarray) -> int | None:
    if len(candidates) == 0:
        return None
    c = np.asarray(candidates, dtype=np.float64)
    ix = np.clip(np.minimum(box[2], c[:, 2]) - np.maximum(box[0], c[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], c[:, 3]) - np.maximum(box[1], c[:, 1]), 0, None)
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]) - inter
    return int(np.argmax(inter / np.maximum(union, 1e-9)))
