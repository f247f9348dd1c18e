"""``cellsam-ray segment-image``: segment one image (a single tile, no Ray) and write its label image.

For checking a model or a setting on one field of view before a whole-slide run. The image is read and
checked completely before the weights load, so a wrong file costs no model time.
"""

from __future__ import annotations

import argparse
import sys

from cellsam_ray.device import resolve_device
from cellsam_ray.io.images import check_output, read_image, write_labels
from cellsam_ray.io.storage import parse_storage_options

HELP = "Segment one .npy/.tif/.png image (H×W or H×W×C, C ≤ 3) with CellSAM and write int32 labels."


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
    parser.add_argument("--mode", choices=("fast", "reference"), default="fast",
                        help="Inference mode (default: fast; reference is the published code step for step).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Where the networks run.")
    parser.add_argument("--sha256", help="Expected SHA-256 hex digest of the checkpoint file.")
    parser.add_argument("--storage-options", metavar="JSON",
                        help="fsspec storage options (JSON object) for remote input, output and weights.")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists (default: refuse).")


def run(args: argparse.Namespace) -> int:
    storage_options = parse_storage_options(args.storage_options) or {}
    check_output(args.output, storage_options, overwrite=args.overwrite)
    image = read_image(args.input, storage_options)
    resolve_device(args.device)  # --device cuda where torch cannot use CUDA: one line saying why

    from cellsam_ray.model import bundled
    from cellsam_ray.model.cellsam import MODES
    from cellsam_ray.model.weights import load_cellsam

    weights, config = bundled.weights_or_bundled(args.weights, args.config)
    if args.weights is None:
        print(f"no --weights given: segmenting with {bundled.DESCRIPTION}; it sees the image stretched to "
              f"{bundled.TILE + 2 * bundled.HALO}² px, so use `segment` for images much larger than that",
              file=sys.stderr)
    model = load_cellsam(weights, config, device=args.device, storage_options=storage_options,
                         sha256=args.sha256, inference=True)
    result = MODES[args.mode](image, model, normalize=args.normalize, device=args.device)
    write_labels(args.output, result.labels, storage_options)
    print(f"{int(result.labels.max())} cells -> {args.output}")
    return 0
