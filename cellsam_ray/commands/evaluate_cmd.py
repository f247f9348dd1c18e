"""``cellsam-ray evaluate PRED [GT]``: the paper's metric between two label images.

F1 at IoU 0.5 (with precision and recall) and the mean IoU of matched cells, as ``cellsam_ray.evaluate``
computes them. Each side is a label image file (.npy, .tif/.tiff) or an OME-Zarr label image, named as
``URL#labels/NAME``, as ``URL --pred-label NAME`` / ``--gt-label NAME``, or as the label group's own URL.
With one slide URL and both ``--pred-label`` and ``--gt-label``, GT may be left out: both come from it.
OME-Zarr labels are scored chunk-block by block, so slides of any size fit in memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from cellsam_ray.errors import UserError

HELP = "Score predicted cell labels against ground truth: F1, precision, recall at IoU 0.5, and mean IoU."

FILE_SUFFIXES = (".npy", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred", metavar="PRED", help="Predicted labels: .npy/.tif file, or OME-Zarr URL "
                        "(URL#labels/NAME, or URL with --pred-label).")
    parser.add_argument("gt", metavar="GT", nargs="?", default=None,
                        help="Ground-truth labels, as PRED (default: PRED's slide, with --gt-label).")
    parser.add_argument("--pred-label", metavar="NAME", help="Label image of the PRED slide to score.")
    parser.add_argument("--gt-label", metavar="NAME", help="Label image of the GT slide to score against.")
    parser.add_argument("--level", type=int, default=0, help="Pyramid level of OME-Zarr labels (default 0).")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="IoU a pair of cells must exceed to match; at least 0.5 (default 0.5).")
    parser.add_argument("--json", action="store_true", help="Print the scores as one JSON object.")
    parser.add_argument("--storage-options", metavar="JSON", help="fsspec storage options for remote URLs.")


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.evaluate import score_zarr
    from cellsam_ray.io.storage import parse_storage_options

    if args.threshold < 0.5 or args.threshold >= 1:
        raise UserError(f"--threshold must lie in [0.5, 1), got {args.threshold}")
    gt = args.gt
    if gt is None:
        if not (args.pred_label and args.gt_label):
            raise UserError("give GT, or one slide URL with both --pred-label and --gt-label")
        gt = args.pred
    options = parse_storage_options(args.storage_options)
    pred = open_labels(args.pred, args.pred_label, args.level, options, "PRED")
    true = open_labels(gt, args.gt_label, args.level, options, "GT")
    if tuple(pred.shape) != tuple(true.shape):
        raise UserError(f"PRED has shape {tuple(pred.shape)} but GT has {tuple(true.shape)}")
    score = score_zarr(pred, true, threshold=args.threshold)
    if args.json:
        print(json.dumps(dict(score.as_dict(), threshold=args.threshold)))
    else:
        print(f"F1@{args.threshold:g} {score.f1:.4f}  precision {score.precision:.4f}  recall {score.recall:.4f}  "
              f"mean IoU {score.mean_iou:.4f}  ({score.true_positives} matched, {score.predicted} predicted, "
              f"{score.true} true cells)")
    return 0


def open_labels(source: str, label: str | None, level: int, storage_options: dict | None, role: str) -> Any:
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
