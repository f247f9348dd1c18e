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

from cellsam_ray.errors import UserError

HELP = "Score predicted cell labels against ground truth: F1, precision, recall at IoU 0.5, and mean IoU."


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
    from cellsam_ray.io.label_sources import open_label_source
    from cellsam_ray.io.storage import parse_storage_options

    if args.threshold < 0.5 or args.threshold >= 1:
        raise UserError(f"--threshold must lie in [0.5, 1), got {args.threshold}")
    gt = args.gt
    if gt is None:
        if not (args.pred_label and args.gt_label):
            raise UserError("give GT, or one slide URL with both --pred-label and --gt-label")
        gt = args.pred
    options = parse_storage_options(args.storage_options)
    pred = open_label_source(args.pred, args.pred_label, args.level, options, "PRED")
    true = open_label_source(gt, args.gt_label, args.level, options, "GT")
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
