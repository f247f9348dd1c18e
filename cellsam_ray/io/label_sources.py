"""A label image as a user names it: a .npy/.tif file, or an OME-Zarr label image (``URL#labels/NAME``, or the
slide's URL and the label's name, or the label group's own URL), as a 2-D integer array read lazily. ``role``
names the side (PRED, GT) in every error, so a wrong argument is one line that says which.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import numpy as np

from cellsam_ray.errors import UserError

FILE_SUFFIXES = (".npy", ".tif", ".tiff")


def open_label_source(source: str, label: str | None, level: int, storage_options: dict | None, role: str) -> Any:
    """A 2-D integer label array (numpy, or zarr read lazily) for a file or an OME-Zarr label image."""
    url, _, fragment = source.partition("#")
    if fragment:
        if label:
            raise UserError(f"{role} {source}: name the label image once, with #labels/NAME or --*-label")
        if not fragment.startswith("labels/") or fragment.count("/") != 1 or fragment == "labels/":
            raise UserError(f"{role} {source}: the part after '#' must be labels/NAME")
        label = fragment.removeprefix("labels/")
    if PurePosixPath(url).suffix.lower() in FILE_SUFFIXES:
        if label:
            raise UserError(f"{role} {source} is a label image file; --*-label and #labels/ apply to OME-Zarr")
        return _plane(_read_file(url, storage_options, role), source, role)
    return _plane(_zarr_labels(url, label, level, storage_options, role), source, role)


def _read_file(path: str, storage_options: dict | None, role: str) -> np.ndarray:
    import io

    import fsspec
    import tifffile

    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{role} {path} not found") from None
    try:
        if path.lower().endswith(".npy"):
            return np.load(io.BytesIO(data), allow_pickle=False)
        return tifffile.imread(io.BytesIO(data))
    except (ValueError, OSError, EOFError, tifffile.TiffFileError) as err:
        raise UserError(f"{role} {path} is not a readable label image: {str(err).splitlines()[0]}") from None


def _zarr_labels(url: str, label: str | None, level: int, storage_options: dict | None, role: str) -> Any:
    from cellsam_ray.io.ngff import open_image

    image = open_image(url, storage_options)
    if label:
        image = image.label(label)
    elif "c" in image.axes:
        names = ", ".join(image.label_names) or "none"
        raise UserError(f"{role} {url} is an image, not labels: name one with #labels/NAME or "
                        f"--{role.lower()}-label NAME (it has: {names})")
    if not 0 <= level < len(image.levels):
        raise UserError(f"--level {level} does not exist in {role} {url}: it has levels 0..{len(image.levels) - 1}")
    return image.array(level)


def _plane(array: Any, source: str, role: str) -> Any:
    """The array's 2-D (y, x) plane, read lazily; leading axes (t, c, z) must have size 1."""
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biu":
        raise UserError(f"{role} {source} has dtype {dtype}; label images hold integers")
    if array.ndim < 2 or any(n != 1 for n in array.shape[:-2]):
        raise UserError(f"{role} {source} has shape {tuple(array.shape)}; expected a 2-D label image")
    return array if array.ndim == 2 else _Plane(array)


class _Plane:
    """The last two axes of an array whose leading axes are all 1, sliced without reading the rest."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(array.shape[-2:])
        self.dtype = array.dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        rows, cols = key[-2:]
        return np.asarray(self.array[(0,) * (self.array.ndim - 2) + (rows, cols)])
