"""``cellsam-ray segment-image``: segment one image (a single tile, no Ray) and write its label image.

For checking a model or a setting on one field of view before a whole-slide run. The image is read and
checked completely before the weights load, so a wrong file costs no model time.
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
from pathlib import Path, PurePosixPath

import fsspec
import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from cellsam_ray.device import resolve_device
from cellsam_ray.errors import UserError, storage_errors
from cellsam_ray.io.storage import parse_storage_options

HELP = "Segment one .npy/.tif/.png image (H×W or H×W×C, C ≤ 3) with CellSAM and write int32 labels."

INPUT_SUFFIXES = (".npy", ".tif", ".tiff", ".png")
OUTPUT_SUFFIXES = (".npy", ".tif", ".tiff")
MODES = {
    "fast": ("cellsam_ray.model.fast", "segment_tile_fast"),
    "reference": ("cellsam_ray.model.reference", "segment_tile_reference"),
}
"""Inference modes offered -> (module, function) with ``segment_tile_reference``'s signature.

``reference`` is the published pipeline, one mask-decoder call per box; ``fast`` gives the same labels
with batched decoding and window-only upsampling (``cellsam_ray/model/fast.py``).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="Image file (.npy, .tif/.tiff, .png), local path or fsspec URL. "
                        "Channels last, in CellSAM order (blank, nuclear, whole-cell), right-aligned: "
                        "one channel is whole-cell, two are nuclear + whole-cell.")
    parser.add_argument("output", help="Where to write the int32 label image (.npy or .tif/.tiff).")
    parser.add_argument("--weights", help="CellSAM checkpoint, local path or fsspec URL (default: the bundled demo "
                        "model, trained on synthetic tissue only).")
    parser.add_argument("--config", help="Model size of --weights: a preset name or a JSON file (default: v1.2).")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                        help="Apply CellSAM's percentile clip + CLAHE normalisation first (default: on).")
    parser.add_argument("--mode", choices=list(MODES), default="fast", help="Inference mode (default: fast).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Where the networks run.")
    parser.add_argument("--sha256", help="Expected SHA-256 hex digest of the checkpoint file.")
    parser.add_argument("--storage-options", metavar="JSON",
                        help="fsspec storage options (JSON object) for remote input, output and weights.")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists (default: refuse).")


def run(args: argparse.Namespace) -> int:
    storage_options = parse_storage_options(args.storage_options) or {}
    _check_output(args.output, storage_options, overwrite=args.overwrite)
    image = read_image(args.input, storage_options)
    resolve_device(args.device)  # --device cuda where torch cannot use CUDA: one line saying why

    from cellsam_ray import bundled
    from cellsam_ray.model.weights import load_cellsam

    weights, config = args.weights, args.config or "v1.2"
    if weights is None:
        if args.config:
            raise UserError("--config gives the sizes of --weights: give both, or neither for the bundled demo model")
        weights, config = str(bundled.WEIGHTS), str(bundled.CONFIG)
        print(f"no --weights given: segmenting with {bundled.DESCRIPTION}; it sees the image stretched to "
              f"{bundled.TILE + 2 * bundled.HALO}² px, so use `segment` for images much larger than that",
              file=sys.stderr)
    module_name, function_name = MODES[args.mode]
    segment_tile = getattr(importlib.import_module(module_name), function_name)
    model = load_cellsam(weights, config, device=args.device, storage_options=storage_options,
                         sha256=args.sha256, inference=True)
    result = segment_tile(image, model, normalize=args.normalize, device=args.device)
    write_labels(args.output, result.labels, storage_options)
    print(f"{int(result.labels.max())} cells -> {args.output}")
    return 0


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


def _check_output(path: str, storage_options: dict, *, overwrite: bool) -> None:
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

