"""F1 at IoU 0.5 of a model on every synthetic style, on slides of seeds given here, as a user would run it.

For each style and seed a slide is written (``write_synthetic_slide(style=...)``) and segmented by the
whole-slide pipeline (``driver.api.segment``: the style's own nuclear and whole-cell channels, the
bundled model's windows sized to the cells as ``segment`` sizes them, fast mode) and its labels scored
against ``labels/ground_truth`` (``evaluate.score_zarr``), pooled over the style's slides.

Brightfield slides go through ``--stain brightfield``: the RGB slide as one grey channel in the
whole-cell slot, as the published CellSAM feeds a stained image.

    python -m cellsam_ray.train.style_eval OUT [--weights W --config C] [--seeds 901 902] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cellsam_ray.evaluate import Score
from cellsam_ray.synth.styles import STYLES, render_style


def pooled(scores: list[Score]) -> Score:
    """One score from several slides' counts (true positives, predictions and true cells summed)."""
    tp = sum(s.true_positives for s in scores)
    predicted, true = sum(s.predicted for s in scores), sum(s.true for s in scores)
    iou = sum(s.mean_iou * s.true_positives for s in scores) / tp if tp else 0.0
    return Score(f1=2 * tp / (predicted + true) if predicted + true else 1.0,
                 precision=tp / predicted if predicted else 1.0, recall=tp / true if true else 1.0,
                 mean_iou=iou, true_positives=tp, predicted=predicted, true=true)


def score_slide(style: str, seed: int, size: int, folder: Path, weights: str | None, config: str | None,
                mode: str = "fast") -> tuple[Score, int]:
    """Write one slide of ``style`` and score the model on it as ``segment`` segments it; (score, the side of
    the windows its cells were given)."""
    from cellsam_ray.evaluate import score_zarr
    from cellsam_ray.io.ngff import open_image
    from cellsam_ray.synth import write_synthetic_slide

    from cellsam_ray.driver.api import segment

    url = str(folder / f"{style}-{seed}-{size}.ome.zarr")
    drawn = render_style(style, (size, size), seed)
    write_synthetic_slide(url, size=(size, size), seed=seed, chunk=256, style=style)
    spec = dict(input=url, stain=drawn.stain, nuclear=list(drawn.nuclear), whole_cell=list(drawn.whole_cell),
                mode=mode, label_name="model", overwrite=True, cell_table=False, qc_images=False)
    if weights:  # a checkpoint of the bundled model's sizes: its windows are sized to the cells as the bundled model's
        spec.update(weights=weights, config=config, cell_diameter="auto")
    report = segment(spec, progress=False)
    image = open_image(url)
    return score_zarr(image.label("model").array(0), image.label("ground_truth").array(0)), report["model"]["window"]


def score_real(image_path: str, mask_path: str, folder: Path, weights: str | None, config: str | None,
               mode: str = "fast") -> Score:
    """A real single-channel nuclear image (TIFF) with its label mask, written as a one-channel slide and
    segmented by the pipeline with that channel as the nuclear one."""
    import tifffile

    from cellsam_ray.evaluate import score_zarr
    from cellsam_ray.io import ngff as ngff_io
    from cellsam_ray.driver.api import segment

    pixels, truth = tifffile.imread(image_path), tifffile.imread(mask_path)
    url = str(folder / (Path(image_path).stem + ".ome.zarr"))
    image = ngff_io.create_image(url, shape=(1,) + pixels.shape, dtype=pixels.dtype, chunks=(1, 256, 256),
                                 axes=ngff_io.image_axes("cyx"), scale=(1.0, 1.0, 1.0),
                                 levels=ngff_io.count_levels(pixels.shape, 256), version=ngff_io.ngff_version("0.5"),
                                 channels=[ngff_io.Channel("nuclei", "0000FF")], name=Path(image_path).stem)
    image.array(0)[:] = pixels[None]
    from cellsam_ray.io import pyramid

    pyramid.build_pyramid(image.arrays(), "image")
    ngff_io.write_label_image(image, "ground_truth", truth.astype(np.uint32), chunks=(256, 256), run_id="style-eval")
    spec = dict(input=url, nuclear=["nuclei"], mode=mode, label_name="model", overwrite=True, cell_table=False,
                qc_images=False)
    if weights:
        spec.update(weights=weights, config=config, cell_diameter="auto")
    segment(spec, progress=False)
    written = ngff_io.open_image(url)
    return score_zarr(written.label("model").array(0), written.label("ground_truth").array(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="Folder for the slides and scores.json.")
    parser.add_argument("--weights", help="Checkpoint (default: the bundled model).")
    parser.add_argument("--config", help="Its model config (with --weights).")
    parser.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[901, 902, 903, 904])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--mode", default="fast", choices=("fast", "reference"))
    parser.add_argument("--real", nargs=2, metavar=("IMAGE", "MASK"),
                        help="Also score a real one-channel nuclear TIFF image against its label mask.")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.real:
        score = score_real(*args.real, out, args.weights, args.config, args.mode)
        results["real"] = {"image": args.real[0], **score.as_dict()}
        print(f"| real: {Path(args.real[0]).name} | {score.f1:.3f} | {score.precision:.3f} | {score.recall:.3f} | "
              f"{score.mean_iou:.3f} | {score.true} | {score.predicted} | | |", flush=True)
    for style in args.styles:
        started = time.perf_counter()
        scored = [score_slide(style, seed, args.size, out, args.weights, args.config, args.mode)
                  for seed in args.seeds]
        score = pooled([s for s, _ in scored])
        results[style] = {"seeds": args.seeds, "size": args.size, "seconds": round(time.perf_counter() - started, 1),
                          **score.as_dict(), "per_slide_f1": [round(s.f1, 3) for s, _ in scored],
                          "windows": [w for _, w in scored]}
        print(f"| {style} | {score.f1:.3f} | {score.precision:.3f} | {score.recall:.3f} | {score.mean_iou:.3f} | "
              f"{score.true} | {score.predicted} | {', '.join(f'{s.f1:.2f}' for s, _ in scored)} | "
              f"{', '.join(str(w) for _, w in scored)} |", flush=True)
        (out / "scores.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
