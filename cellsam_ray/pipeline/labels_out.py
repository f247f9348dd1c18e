"""Writing ``labels/<name>``: fill level ``plan.level`` core by core, then the other levels; files beside it.

Only this module and ``pipeline.lifecycle`` (which creates, replaces and publishes the label image) write
to the slide, and only under ``labels/``: the image's own arrays are opened read-only everywhere else.
Every chunk has exactly one writer: a tile core holds whole chunks of the segmented level, and each chunk
of another level is built whole from the level next to it.
"""

from __future__ import annotations

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
    """Levels to build after the segmented one: coarser ones outward, then finer ones inward."""
    n = len(plan.label_shapes)
    return list(range(plan.level + 1, n)) + list(range(plan.level - 1, -1, -1))


def chunk_indices(plan: SlidePlan, level: int) -> list[tuple[int, ...]]:
    """Grid positions of the chunks of a label level that lie in the segmented plane (t, z)."""
    label_axes = [a for a in plan.axes if a != "c"]
    return [
        index
        for index in pyramid.output_chunks(label_arrays(plan)[level])
        if all(index[i] == plan.plane[a] for i, a in enumerate(label_axes) if a in plan.plane)
    ]


def build_chunk(plan: SlidePlan, level: int, chunk_index: tuple[int, ...]) -> None:
    """Write one whole chunk of ``level`` from the level next to it towards the segmented one.

    Coarser levels take the mode with foreground priority of each 2×2 block; finer ones (when a coarse
    level was segmented) repeat each label pixel 2×2. Neither ever mixes ids.
    """
    arrays = label_arrays(plan)
    label_axes = [a for a in plan.axes if a != "c"]
    yx = (label_axes.index("y"), label_axes.index("x"))
    if level > plan.level:
        pyramid.build_chunk(arrays[level - 1], arrays[level], chunk_index, factor=2, kind="labels", axes=yx)
        return
    target, source = arrays[level], arrays[level + 1]
    c = plan.spec.chunk
    h, w = plan.label_shapes[level]
    ys = slice(chunk_index[yx[0]] * c, min((chunk_index[yx[0]] + 1) * c, h))
    xs = slice(chunk_index[yx[1]] * c, min((chunk_index[yx[1]] + 1) * c, w))
    src_ys, src_xs = slice(ys.start // 2, -(-ys.stop // 2)), slice(xs.start // 2, -(-xs.stop // 2))
    block = np.asarray(source[plane_selection(plan, src_ys, src_xs)])
    up = np.repeat(np.repeat(block, 2, axis=0), 2, axis=1)
    oy, ox = ys.start - 2 * src_ys.start, xs.start - 2 * src_xs.start
    target[plane_selection(plan, ys, xs)] = up[oy : oy + ys.stop - ys.start, ox : ox + xs.stop - xs.start]


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
