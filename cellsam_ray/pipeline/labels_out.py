"""Writing ``labels/<name>``: create it once, fill level ``plan.level`` core by core, then the other levels.

Only this module writes to the slide, and only under ``labels/<name>``: the image's own arrays are opened
read-only everywhere else. Every chunk has exactly one writer: a tile core holds whole chunks of the
segmented level, and each chunk of another level is built whole from the level next to it.

The run's work prefix (``labels/<name>/work`` unless the spec names another) holds the spec's fingerprint:
a rerun of the same spec resumes there without ``--overwrite``; any other spec must not touch it.
"""

from __future__ import annotations

import json
import posixpath
from functools import lru_cache

import fsspec
import numpy as np

from cellsam_ray.errors import UserError
from cellsam_ray.io import pyramid
from cellsam_ray.io.ngff import create_labels, open_image
from cellsam_ray.io.storage import join_url
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.tiling import Tile

# Spec fields that do not change the output, so a resume may differ in them.
RUN_ONLY_FIELDS = {"workers", "gpus_per_worker", "batch_size", "overwrite", "storage_options", "device",
                   "cell_table", "cell_table_h5ad", "qc_images", "storage_options_env", "storage_profile"}
FINGERPRINT = "spec.json"


def fingerprint(plan: SlidePlan) -> bytes:
    fields = plan.spec.model_dump(mode="json", by_alias=True, exclude=RUN_ONLY_FIELDS)
    return json.dumps(fields, sort_keys=True).encode()


def is_resumable(plan: SlidePlan) -> bool:
    return plan.work.read_file(FINGERPRINT) == fingerprint(plan)


def prepare(plan: SlidePlan) -> None:
    """Create the empty label image, or find the unfinished run of the same spec to resume."""
    image = open_image(plan.spec.input, plan.spec.storage_options, mode="r+")
    exists = plan.spec.label_name in image.label_names
    if exists and not plan.spec.overwrite:
        if is_resumable(plan):
            return
        raise UserError(f"labels/{plan.spec.label_name} already exists in {plan.spec.input}: choose another "
                        "--label-name or pass --overwrite")
    if plan.spec.overwrite:
        plan.work.remove()
    chunks = [plan.spec.chunk if a in ("y", "x") else 1 for a in plan.axes if a != "c"]
    create_labels(image, plan.spec.label_name, chunks=chunks, overwrite=plan.spec.overwrite)
    plan.work.write_file(FINGERPRINT, fingerprint(plan))


@lru_cache(maxsize=4)
def _label_arrays(url: str, name: str, options_json: str) -> list:
    image = open_image(url, json.loads(options_json), mode="r+")
    return image.label(name).arrays()


def label_arrays(plan: SlidePlan) -> list:
    return _label_arrays(plan.spec.input, plan.spec.label_name, json.dumps(plan.spec.storage_options, sort_keys=True))


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
    fs, path = fsspec.core.url_to_fs(url, **(plan.spec.storage_options or {}))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)
    return url


def finish(plan: SlidePlan, report: dict) -> None:
    """Write the run report beside the labels and drop the work prefix: the run is complete."""
    write_sidecar(plan, "report.json", json.dumps(report, indent=2).encode())
    plan.work.remove()
