"""CellSAM behind the segmenter contract (``cellsam_ray.segmenter``), for the whole-slide pipeline.

A window arrives as the slide-normalised (nuclear, whole-cell) channels; CellSAM takes channels
(blank, nuclear, whole-cell), so the window is laid out that way with the library normalisation off
(the slide-wide one already ran: per-tile statistics would make the two sides of a seam disagree).
Each tile's answer is CellSAM's own per-tile label image, after its hole filling and small-object
removal, handed to the merge as one mask per cell with the score and predicted IoU of the box that
painted it (tracked through the cleanup, not guessed).

Besides ``segment_batch`` the segmenter offers the two-phase form the model actors use:
``infer_batch`` is the part that needs the model (run under the actor's model lock) and returns one
callable per window for the host work (cleanup and cutting out the cells), run after the lock is
released, while the next batch is on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from cellsam_ray.model import precision
from cellsam_ray.model.fast import BOX_CHUNK, PAINT_BOXES, finish_tile, infer_tiles, segment_tile_fast
from cellsam_ray.model.reference import TileSegmentation, segment_tile_reference

MODES = {"fast": segment_tile_fast, "reference": segment_tile_reference}
"""Inference modes -> the per-tile function (one signature). ``reference`` is the published pipeline, one
mask-decoder call per box; ``fast`` gives the same labels with batched decoding and window-only upsampling
(``model/fast.py``), and the segmenter runs it on batches of tiles (``fast.infer_tiles``)."""


class CellSAMSegmenter:
    def __init__(self, model, *, mode: str = "fast", device: str = "cpu", bbox_threshold: float = 0.4,
                 batch_size: int = 4, precision_name: str = "fp32") -> None:
        self.model = model
        self.mode = mode
        self.device = device
        self.bbox_threshold = bbox_threshold
        self.batch_size = batch_size
        self.precision = precision.resolve(precision_name, device)
        kind = torch.device(device).type
        self.box_chunk = BOX_CHUNK.get(kind, BOX_CHUNK["cuda"])
        self.paint_boxes = PAINT_BOXES.get(kind, PAINT_BOXES["cuda"])

    def segment(self, window: np.ndarray, *, origin: tuple[int, int]) -> dict[str, Any]:
        return self.segment_batch([window], origins=[origin])[0]

    def segment_batch(self, windows: list[np.ndarray], *, origins: list[tuple[int, int]]) -> list[dict[str, Any]]:
        return [finish() for finish in self.infer_batch(windows, origins=origins)]

    def infer_batch(self, windows: list[np.ndarray], *, origins: list[tuple[int, int]]) -> list[Callable[[], dict]]:
        """The model's part of ``segment_batch``; calling each result does the rest (host work only)."""
        options = dict(normalize=False, bbox_threshold=self.bbox_threshold, device=self.device)
        if self.mode == "fast":
            painted = infer_tiles(windows, self.model, roles=True, tile_batch=self.batch_size, box_chunk=self.box_chunk,
                                  paint_boxes=self.paint_boxes, precision_name=self.precision, **options)
            return [partial(_cells_of_painted, tile) for tile in painted]
        tiles = [MODES[self.mode](cellsam_layout(w), self.model, **options) for w in windows]
        return [partial(cells_of, tile) for tile in tiles]

    def on_out_of_memory(self) -> bool:
        """Halve the decoder chunk and the boxes painted at once (the actor halves its batches too);
        whether anything was left to shrink."""
        shrunk = self.box_chunk > 1 or self.paint_boxes > 0
        self.box_chunk = max(self.box_chunk // 2, 1)
        self.paint_boxes = self.paint_boxes // 2
        return shrunk


def cellsam_layout(window: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in CellSAM's channel order (blank, nuclear, whole-cell) from (roles, H, W)."""
    image = np.zeros(window.shape[1:] + (3,), dtype=np.float32)
    image[..., 1] = window[0]
    if len(window) > 1:
        image[..., 2] = window[1]
    return image


def _cells_of_painted(tile) -> dict[str, Any]:
    return cells_of(finish_tile(tile))


def cells_of(tile: TileSegmentation) -> dict[str, Any]:
    """The contract's boxes, scores, ious and masks: one per cell of the tile's label image.

    A cell's box is its mask's extent (``tile.cell_regions``, kept by the cleanup); its score and
    predicted IoU are those of the box whose mask painted it (``tile.cell_rows``).
    """
    boxes, rows, masks = [], [], []
    for index, found in enumerate(tile.cell_regions):
        if found is None:
            continue
        y, x = found
        boxes.append((x.start, y.start, x.stop, y.stop))
        rows.append(tile.cell_rows[index])
        masks.append(tile.labels[y, x] == index + 1)
    rows = np.asarray(rows, dtype=np.int64)
    return {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            "scores": tile.scores[rows].astype(np.float64), "ious": tile.ious[rows].astype(np.float64),
            "masks": masks}
