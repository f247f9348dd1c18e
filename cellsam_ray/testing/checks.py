"""What tests assert with: the OME-Zarr validator (ome-zarr-models, the reference), checksums that prove
bytes unchanged, label images equal up to relabelling, outlines against QuPath's GeoJSON reader and
against the labels they outline, and the shared reference data."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cellsam_ray.io.storage import open_group


def array_checksums(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """SHA-256 of every array of the image's pyramid (not its labels), to prove a run left them untouched."""
    from cellsam_ray.io.ngff import open_image

    image = open_image(url, storage_options)
    return {level.path: hashlib.sha256(image.array(i)[:].tobytes()).hexdigest()
            for i, level in enumerate(image.levels)}


def file_checksums(folder: str | Path, skip: str | None = None) -> dict[str, str]:
    """SHA-256 of every file below a local ``folder`` (except below the relative path ``skip``), by path: the
    stored bytes themselves, which ``array_checksums`` cannot read where a chunk is damaged."""
    root = Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not (skip and str(p.relative_to(root)).startswith(skip))}


def label_chunk_files(slide: str, name: str) -> dict[str, bytes]:
    """Every chunk file of every level of a local slide's labels/<name>, by path below it (metadata left
    out): two runs' labels compared byte for byte."""
    root = Path(slide, "labels", name)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("s*/**/*"))
            if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs")}


class InvalidOmeZarr(AssertionError):
    """ome-zarr-models rejected a dataset; the message is the validator's."""


def validate_ome_zarr(url_or_group: str | zarr.Group, storage_options: dict[str, Any] | None = None) -> Any:
    """Validate an OME-Zarr image (with its ``labels/``) or label image with ome-zarr-models.

    Returns the validated model (``v04.Image``, ``v05.ImageLabel``, ...); raises InvalidOmeZarr with the
    validator's message otherwise. The NGFF version is taken from the zarr format (0.4 = v2, 0.5 = v3).
    """
    from ome_zarr_models import v04, v05

    if isinstance(url_or_group, zarr.Group):
        group, where = url_or_group, str(url_or_group.store)
    else:
        group, where = open_group(url_or_group, storage_options, mode="r"), url_or_group
    models = v04 if group.metadata.zarr_format == 2 else v05
    attrs = dict(group.attrs)
    ome = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    model = models.ImageLabel if "image-label" in ome else models.Image
    try:
        return model.from_zarr(group)
    except Exception as err:  # noqa: BLE001 - pydantic, ValueError, RuntimeError: all mean "invalid"
        raise InvalidOmeZarr(f"{where} is not a valid {model.__module__}.{model.__name__}: {err}") from err


def reference_dir() -> Path:
    """The shared reference material: ``$CELLSAM_REFERENCE_DIR``, else ``../shared/reference`` beside the
    repository checkout (where the project keeps it). Missing data is an error, not a reason to skip: the
    golden tests are what proves the model reproduces the published one."""
    configured = os.environ.get("CELLSAM_REFERENCE_DIR")
    folder = Path(configured) if configured else Path(__file__).resolve().parents[3] / "shared" / "reference"
    if not (folder / "golden" / "cases.json").is_file():
        raise FileNotFoundError(f"no reference data at {folder} (expected golden/cases.json there); "
                                "set CELLSAM_REFERENCE_DIR to the folder holding golden/")
    return folder


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same cells, each possibly under another id."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def qupath_problems(collection: dict) -> list[str]:
    """What QuPath's GeoJSON reader (``PathObjectTypeAdapters`` in qupath-core) would not take as cell
    objects: a FeatureCollection of Features with a Polygon or MultiPolygon geometry,
    ``properties.objectType`` "cell", ``properties.measurements`` an object of numbers (it reads them as
    doubles: no strings, no booleans, no NaN), and no string ``id`` that it would read as another object's
    UUID."""
    if collection.get("type") != "FeatureCollection" or not isinstance(collection.get("features"), list):
        return ["not a FeatureCollection"]
    problems = []
    for f in collection["features"]:
        props = f.get("properties", {})
        if f.get("type") != "Feature" or f.get("geometry", {}).get("type") not in ("Polygon", "MultiPolygon"):
            problems.append(f"feature {f.get('id')}: not a polygon feature")
        if props.get("objectType") != "cell":
            problems.append(f"feature {f.get('id')}: objectType {props.get('objectType')!r}")
        values = props.get("measurements")
        if not isinstance(values, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
            problems.append(f"feature {f.get('id')}: measurements not all numbers")
        if isinstance(f.get("id"), str):
            problems.append(f"feature {f.get('id')}: a string id QuPath would parse as a UUID")
    return problems


def outline_ious(ids: list[int], geometries, labels: np.ndarray, downsample=(1.0, 1.0)) -> dict[int, float]:
    """Each outline's IoU with its cell in ``labels`` (a level ``downsample`` times coarser than the
    outlines' coordinates): the polygon rasterised (pixels whose centre lies inside) over the union of
    both boxes."""
    import shapely

    out = {}
    for cell, geometry in zip(ids, geometries):
        gx0, gy0, gx1, gy1 = geometry.bounds
        ys, xs = np.nonzero(labels == cell)
        y0, x0 = min(ys.min(), int(gy0 / downsample[0])), min(xs.min(), int(gx0 / downsample[1]))
        y1 = max(ys.max() + 1, math.ceil(gy1 / downsample[0]))
        x1 = max(xs.max() + 1, math.ceil(gx1 / downsample[1]))
        rows, cols = np.mgrid[y0:y1, x0:x1]
        drawn = shapely.contains_xy(geometry, (cols + 0.5) * downsample[1], (rows + 0.5) * downsample[0])
        truth = labels[y0:y1, x0:x1] == cell
        out[cell] = float((drawn & truth).sum() / (drawn | truth).sum())
    return out
