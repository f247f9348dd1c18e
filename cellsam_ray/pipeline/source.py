"""What a model worker does before the model: open the slide once per process, read a padded window,
and build the segmenter the plan names."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from cellsam_ray.device import resolve_device
from cellsam_ray.io.ngff import open_image
from cellsam_ray.pipeline.pixels import read_channels
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.pipeline.stain import stain
from cellsam_ray.segmenter import Segmenter, load_segmenter
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.tiling import Tile


@lru_cache(maxsize=4)
def _level_array(url: str, level: int, storage_options_json: str):
    image = open_image(url, json.loads(storage_options_json))
    return image.array(level)


def level_array(plan: SlidePlan):
    options = json.dumps(plan.spec.storage.options(), sort_keys=True)
    return _level_array(plan.spec.input, plan.level, options)


def read_window(plan: SlidePlan, tile: Tile) -> np.ndarray:
    """The tile's full-size window (roles, S, S) as the stain makes it, padded past the slide's borders with
    the stain's background (``--padding zero``) or by reflection."""
    return read_windows(plan, [tile])[0]


def read_windows(plan: SlidePlan, tiles: list[Tile]) -> list[np.ndarray]:
    """``read_window`` of each tile. Neighbouring tiles of a row are read as one region: their windows
    overlap by twice the halo, so a batch of four reads ~30% fewer image chunks than four windows."""
    windows = {}
    for run in _row_runs(tiles):
        y0, x0, y1, x1 = _inside(plan, run[0])
        x1 = _inside(plan, run[-1])[3]
        raw = read_channels(level_array(plan), plan.axes, plan.plane, plan.channels, slice(y0, y1), slice(x0, x1))
        for tile in run:
            ty0, tx0, ty1, tx1 = _inside(plan, tile)
            windows[tile.key] = _window(plan, tile, raw[:, ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0])
    return [windows[t.key] for t in tiles]


def _row_runs(tiles: list[Tile]) -> list[list[Tile]]:
    """The tiles as runs of consecutive columns of one row (the tiles of a run share one read)."""
    runs: list[list[Tile]] = []
    for tile in sorted(tiles, key=lambda t: (t.row, t.col)):
        if runs and runs[-1][-1].row == tile.row and runs[-1][-1].col + 1 == tile.col:
            runs[-1].append(tile)
        else:
            runs.append([tile])
    return runs


def _inside(plan: SlidePlan, tile: Tile) -> tuple[int, int, int, int]:
    """The part of the tile's window inside the image: y0, x0, y1, x1."""
    size, (wy0, wx0) = tile.window_size, tile.origin
    return (max(wy0, 0), max(wx0, 0), min(wy0 + size, plan.grid.height), min(wx0 + size, plan.grid.width))


def _window(plan: SlidePlan, tile: Tile, raw: np.ndarray) -> np.ndarray:
    """The window from the raw pixels of its part inside the image, stained and padded."""
    size, (wy0, wx0) = tile.window_size, tile.origin
    y0, x0, y1, x1 = _inside(plan, tile)
    kind = stain(plan.spec.stain)
    inside = kind.window(raw, plan.roles, plan.scales, level_array(plan).dtype)
    pad = ((y0 - wy0, wy0 + size - y1), (x0 - wx0, wx0 + size - x1))
    if not any(p for pair in pad for p in pair):
        return inside  # a window inside the image: no copy
    if plan.spec.padding == "reflect" and min(inside.shape[1:]) > 1:
        return np.pad(inside, ((0, 0),) + pad, mode="reflect")
    return np.stack([np.pad(role, pad, constant_values=value)
                     for role, value in zip(inside, kind.background(len(inside)))])


def build_segmenter(plan: SlidePlan, *, gpu_holder: str | None = None) -> Segmenter:
    """The plan's segmenter; ``gpu_holder`` names this process if it holds a GPU, which CellSAM then must use."""
    if plan.spec.segmenter:
        return load_segmenter(plan.spec.segmenter, plan.spec.segmenter_options)
    return cellsam_segmenter(plan.spec, gpu_holder=gpu_holder)


def cellsam_segmenter(spec: SegmentSpec, *, gpu_holder: str | None = None):
    """CellSAM as the spec describes it: its weights on the device it may use (``device.resolve_device``), in
    its precision, limited to its share of a GPU's memory."""
    import torch

    from cellsam_ray.model import precision
    from cellsam_ray.model.cellsam import CellSAMSegmenter
    from cellsam_ray.model.weights import load_cellsam

    device = resolve_device(spec.device, gpu_holder=gpu_holder)
    chosen = precision.configure(spec.precision, device)
    if device == "cuda" and spec.gpus_per_worker < 1:  # actors sharing a GPU share its memory too
        torch.cuda.set_per_process_memory_fraction(spec.gpus_per_worker)
    model = load_cellsam(spec.weights, spec.model_config_name, device=device, storage_options=spec.storage.options(),
                         sha256=spec.weights_sha256, inference=True)
    return CellSAMSegmenter(model, mode=spec.mode, device=device, bbox_threshold=spec.bbox_threshold,
                            batch_size=spec.batch_size, precision_name=chosen)
