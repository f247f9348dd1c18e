"""``cellsam-ray demo``: one command, nothing to configure, the real pipeline on a synthetic slide.

It writes a synthetic multiplexed slide in a local folder, starts a local Ray cluster and runs the same
``segment`` code path a user runs, then scores the labels against the slide's ground truth.

It segments with the bundled demo model (the published weights are licence-gated), so the score is a real
model's. ``--weights`` runs another CellSAM checkpoint; ``--oracle`` puts the ground-truth oracle segmenter
in the model's place, so that every stage but the model is real and the score checks the merge alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Segment a synthetic slide end to end on a local Ray cluster, and score it against its ground truth."
ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output", help="Folder for the slide and results (default: %(default)s).")
    parser.add_argument("--size", type=int, default=1024, help="Slide height and width in pixels (default: %(default)s).")
    parser.add_argument("--weights", default=None, help="A CellSAM checkpoint to run instead of the bundled model.")
    parser.add_argument("--config", default="v1.2", help="Model sizes for --weights: v1.2 or a JSON file.")
    parser.add_argument("--oracle", action="store_true",
                        help="Segment with the ground-truth oracle instead of a model (checks the pipeline alone).")
    parser.add_argument("--seed", type=int, default=7, help="Synthetic slide seed (default: %(default)s).")


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.evaluate import score_zarr
    from cellsam_ray.io.ngff import open_image
    from cellsam_ray.driver.api import segment
    from cellsam_ray.synth import write_synthetic_slide

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    url = str(out / "slide.ome.zarr")
    print(f"1/3 writing a synthetic {args.size}×{args.size} multiplexed slide to {url}")
    info = write_synthetic_slide(url, size=(args.size, args.size), channels=4, ngff="0.5", seed=args.seed)
    print(f"    channels: {', '.join(info.channel_names)}; {info.levels} pyramid levels; {info.seconds:.1f} s")

    spec = dict(input=url, nuclear=[info.channel_names[0]], whole_cell=[info.channel_names[1]], overwrite=True)
    if args.oracle:
        spec.update(segmenter=ORACLE, segmenter_options=dict(labels=url))  # the slide's own ground truth
        print("2/3 segmenting on a local Ray cluster with the ground-truth oracle in the model's place\n"
              "    (the real pipeline: tiling, Ray actors, seam reconciliation, label pyramid)")
    elif args.weights:
        spec.update(weights=args.weights, config=args.config)
        print(f"2/3 segmenting with CellSAM ({args.weights}) on a local Ray cluster")
    else:
        from cellsam_ray.model import bundled

        print(f"2/3 segmenting on a local Ray cluster with {bundled.DESCRIPTION}")
    report = segment(spec)
    summary = report["summary"]

    image = open_image(url)
    score = score_zarr(image.label("cells").array(0), image.label("ground_truth").array(0))
    print("3/3 done")
    print(f"    labels:  {summary['labels']}  ({summary['cells']} cells, {summary['tiles']} tiles, "
          f"{summary['tiles_skipped_no_tissue']} without tissue skipped, "
          f"{summary['seam_reconciliations']} seam copies reconciled)")
    print(f"    report:  {summary['labels']}/report.json")
    if summary.get("cell_table"):
        print(f"    cells:   {summary['cell_table']}  (position, shape, scores, intensity in every channel)")
    outlines = (report.get("cell_table") or {}).get("outlines")
    if outlines:
        print(f"    outlines: {outlines['geojson']}  (QuPath: File > Import objects from file)")
        print(f"              {outlines['geoparquet']}  (geopandas.read_parquet)")
    if summary.get("qc_overview"):
        print(f"    QC:      {summary['qc_overview']}  (tile and seam crops beside it)")
    print(f"    vs ground truth: F1@0.5 {score.f1:.3f}  precision {score.precision:.3f}  recall {score.recall:.3f}"
          f"  mean IoU {score.mean_iou:.3f}" + ("  (oracle: this checks the merge)" if args.oracle else ""))
    print(f"    view it: napari --plugin napari-ome-zarr {url}")
    return 0
