"""Single images as files: reading a .npy/.tif/.png image (local or any fsspec URL) into CellSAM's
channel layout, and writing an int32 label image, refusing to replace one unless asked. ``segment-image``
and training's folders of image + label pairs read images the same way.
"""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath

import fsspec
import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from cellsam_ray.errors import UserError, storage_errors

INPUT_SUFFIXES = (".npy", ".tif", ".tiff", ".png")
OUTPUT_SUFFIXES = (".npy", ".tif", ".tiff")


def read_image(path: str, storage_options: dict) -> np.ndarray:
    """The image at ``path`` as an (H, W) or (H, W, C ≤ 3) finite numeric array; else a UserError."""
    suffix = _check_suffix(path, INPUT_SUFFIXES, "input")
    try:
        with fsspec.open(path, "rb", **storage_options) as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"input {path} not found") from None
    if not data:
        raise UserError(f"input {path} is an empty file")
    try:
        image = _decode(data, suffix)
    except (ValueError, OSError, EOFError, UnidentifiedImageError, tifffile.TiffFileError) as err:
        raise UserError(f"input {path} is not a readable {suffix} image: {str(err).splitlines()[0]}") from None
    _check_image(image, path)
    return image


def _decode(data: bytes, suffix: str) -> np.ndarray:
    if suffix == ".npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if suffix == ".png":
        with Image.open(io.BytesIO(data)) as png:
            if png.mode == "P":
                raise ValueError("palette PNG; save it as grayscale or RGB")
            return np.asarray(png)
    return tifffile.imread(io.BytesIO(data))


def _check_image(image: np.ndarray, path: str) -> None:
    if image.dtype.kind not in "biuf":
        raise UserError(f"input {path} has dtype {image.dtype}; expected numbers")
    if image.ndim not in (2, 3):
        raise UserError(f"input {path} has shape {image.shape}; expected H×W or H×W×C (channels last)")
    if image.ndim == 3 and not 1 <= image.shape[2] <= 3:
        raise UserError(
            f"input {path} has shape {image.shape}, i.e. {image.shape[2]} channels; CellSAM takes at most 3 "
            "(blank, nuclear, whole-cell), channels last"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise UserError(f"input {path} has shape {image.shape}; it holds no pixels")
    if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
        raise UserError(f"input {path} contains NaN or infinite values")


def write_labels(path: str, labels: np.ndarray, storage_options: dict) -> None:
    """Write an int32 label image as .npy or .tif/.tiff (local path or fsspec URL)."""
    buffer = io.BytesIO()
    if PurePosixPath(path).suffix.lower() == ".npy":
        np.save(buffer, labels.astype(np.int32, copy=False))
    else:
        tifffile.imwrite(buffer, labels.astype(np.int32, copy=False))
    try:
        with fsspec.open(path, "wb", **storage_options) as f:
            f.write(buffer.getvalue())
    except OSError as err:
        raise UserError(f"cannot write output {path}: {err}") from None


def check_output(path: str, storage_options: dict, *, overwrite: bool) -> None:
    """Catch an unusable output path, or one that would replace a file unasked, before any model time."""
    _check_suffix(path, OUTPUT_SUFFIXES, "output")
    protocol, bare = fsspec.core.split_protocol(path)
    if protocol in (None, "file", "local") and not Path(bare).parent.is_dir():
        raise UserError(f"output {path}: folder {Path(bare).parent} does not exist")
    if not overwrite:
        with storage_errors(refused=f"output {path} cannot be checked", unreachable=f"output {path} cannot be checked"):
            fs, where = fsspec.core.url_to_fs(path, **storage_options)
            exists = fs.exists(where)
        if exists:
            raise UserError(f"output {path} already exists: pass --overwrite to replace it")


def _check_suffix(path: str, allowed: tuple[str, ...], role: str) -> str:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in allowed:
        shown = repr(suffix) if suffix else "(none)"
        raise UserError(f"{role} {path}: unknown extension {shown}; expected one of {', '.join(allowed)}")
    return suffix
