"""Writing ``labels/<name>``: fill level ``plan.level`` core by core, then the other levels; files beside it.

Only this module and ``driver.lifecycle`` (which creates, replaces and publishes the label image) write
to the slide, and only under ``labels/``: the image's own arrays are opened read-only everywhere else.
Every chunk has exactly one writer: a tile core holds whole chunks of the segmented level, and each chunk
of another level is built whole from the level next to it.
"""

from __future__ import annotations

import itertools
import json
import posixpath
from functools import lru_cache

import fsspec
import numpy as np

from cellsam_ray.io import pyramid
from cellsam_ray.io.ngff import open_image
from cellsam_ray.io.storage import join_url
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.tiling import Tile


@lru_cache(maxsize=4)
def _label_arrays(url: str, name: str, options_json: str, run_id: str) -> list:
    image = open_image(url, json.loads(options_json), mode="r+")
    return image.label(name, complete=False).arrays()


def label_arrays(plan: SlidePlan) -> list:
    """The label arrays this run writes, opened once per process and run (a worker may serve several
    runs in turn, and an overwrite recreates the arrays)."""
    options = json.dumps(plan.spec.storage.options(), sort_keys=True)
    return _label_arrays(plan.spec.input, plan.spec.label_name, options, plan.run_id)


def plane_selection(plan: SlidePlan, ys: slice, xs: slice) -> tuple:
    return tuple(plan.plane[a] if a in plan.plane else (ys if a == "y" else xs) for a in plan.axes if a != "c")


def write_core(plan: SlidePlan, tile: Tile, labels: np.ndarray) -> None:
    array = label_arrays(plan)[plan.level]
    array[plane_selection(plan, slice(tile.core_y0, tile.core_y1), slice(tile.core_x0, tile.core_x1))] = labels


def build_order(plan: SlidePlan) -> list[int]:
    """Levels to build after the segmented one: coarser ones outward, then finer ones inward, so each is
    built after the level it is made from (``plan.label_maps``)."""
    n = len(plan.label_shapes)
    return list(range(plan.level + 1, n)) + list(range(plan.level - 1, -1, -1))


def source_level(plan: SlidePlan, level: int) -> int:
    """The level that ``level`` is made from: the next one towards the segmented level."""
    return level - 1 if level > plan.level else level + 1


def plane_spans(plan: SlidePlan) -> list[dict[int, tuple[int, int]]]:
    """Per label level, for each label axis of the segmented plane (t, z), the index range it covers there.

    At the segmented level that is the chosen plane; a level made by resampling t or z (a pyramid that
    halves z too) covers the planes made from it, so only chunks of those ever hold labels.
    """
    label_axes = [a for a in plan.axes if a != "c"]
    planes = {i: (plan.plane[a], plan.plane[a] + 1) for i, a in enumerate(label_axes) if a in plan.plane}
    spans: list[dict[int, tuple[int, int]]] = [{} for _ in plan.label_shapes]
    spans[plan.level] = planes
    for level in build_order(plan):
        source = spans[source_level(plan, level)]
        spans[level] = {i: plan.label_maps[level][i].target_span(*span) for i, span in source.items()}
    return spans


def chunk_indices(plan: SlidePlan, level: int) -> list[tuple[int, ...]]:
    """Grid positions of the chunks of a label level that lie in the segmented plane (t, z)."""
    array = label_arrays(plan)[level]
    unit = array.shards or array.chunks
    spans = plane_spans(plan)[level]
    ranges = []
    for i, (n, c) in enumerate(zip(array.shape, unit)):
        lo, hi = spans.get(i, (0, n))
        ranges.append(range(lo // c, -(-hi // c)))
    return list(itertools.product(*ranges))


def build_label_chunk(plan: SlidePlan, level: int, chunk_index: tuple[int, ...]) -> None:
    """Write one whole chunk of ``level`` from the level next to it towards the segmented one.

    Coarser levels take the mode with foreground priority of each target pixel's source block, finer ones
    (when a coarse level was segmented) repeat the source pixel under each target pixel; the blocks come
    from the two levels' real shapes and scales (``pyramid.AxisMap``). Neither ever mixes ids.
    """
    arrays = label_arrays(plan)
    pyramid.build_chunk(arrays[source_level(plan, level)], arrays[level], chunk_index, "labels",
                        plan.label_maps[level])


def sidecar_url(plan: SlidePlan, *parts: str) -> str:
    """Where a file beside the labels lives (the report, the cell table, QC images)."""
    return join_url(plan.spec.input, plan.labels_path, *parts)


def write_sidecar(plan: SlidePlan, relative: str, data: bytes) -> str:
    """Write a file beside the labels (``relative`` may name a subfolder, e.g. ``qc/overview.png``)."""
    url = sidecar_url(plan, *relative.split("/"))
    fs, path = fsspec.core.url_to_fs(url, **(plan.spec.storage.options() or {}))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)
    return url


def read_sidecar(plan: SlidePlan, relative: str) -> bytes | None:
    """A file beside the labels, or None where there is none."""
    fs, path = fsspec.core.url_to_fs(sidecar_url(plan, *relative.split("/")), **(plan.spec.storage.options() or {}))
    return fs.cat_file(path) if fs.exists(path) else None
