"""What a model worker does before the model: open the slide once per process, read a padded window,
and build the segmenter the plan names."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from cellsam_ray.io.ngff import open_image
from cellsam_ray.pipeline.pixels import read_channels
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.pipeline.stain import stain
from cellsam_ray.segmenter import Segmenter, load_segmenter
from cellsam_ray.tiling import Tile


@lru_cache(maxsize=4)
def _level_array(url: str, level: int, storage_options_json: str):
    image = open_image(url, json.loads(storage_options_json))
    return image.array(level)


def level_array(plan: SlidePlan):
    options = json.dumps(plan.spec.storage.options(), sort_keys=True)
    return _level_array(plan.spec.input, plan.level, options)


def read_window(plan: SlidePlan, tile: Tile) -> np.ndarray:
    """The tile's full-size window (roles, S, S) as the stain makes it; zero or reflect padding past the borders."""
    size = tile.window_size
    wy0, wx0 = tile.origin
    y0, x0 = max(wy0, 0), max(wx0, 0)
    y1, x1 = min(wy0 + size, plan.grid.height), min(wx0 + size, plan.grid.width)
    array = level_array(plan)
    raw = read_channels(array, plan.axes, plan.plane, plan.channels, slice(y0, y1), slice(x0, x1))
    inside = stain(plan.spec.stain).window(raw, plan.roles, plan.scales, array.dtype)
    pad = ((0, 0), (y0 - wy0, wy0 + size - y1), (x0 - wx0, wx0 + size - x1))
    if plan.spec.padding == "reflect" and min(inside.shape[1:]) > 1:
        return np.pad(inside, pad, mode="reflect")
    return np.pad(inside, pad)


def build_segmenter(plan: SlidePlan) -> Segmenter:
    if plan.spec.segmenter:
        return load_segmenter(plan.spec.segmenter)
    from cellsam_ray.model.segmenter import CellSAMSegmenter

    return CellSAMSegmenter.from_spec(plan.spec)
