"""Time reference vs fast CellSAM inference per tile: ``python -m cellsam_ray.bench.model``.

Two models: the golden tiny checkpoint on the golden tiles (real detections, default thresholds), and
the v1.2 sizes with random weights. Random weights detect nothing useful, so for v1.2 the box score
threshold is chosen to pass a fixed number of boxes and the IoU filter is off: both modes then decode
and paste the same boxes, which is the work being compared.

Per tile, each mode is timed twice: as is, and with a box threshold nothing passes (preprocessing,
encoders and detector only). The difference divided by the boxes gives the cost per box. Every
time is the best of ``--repeats`` runs. Wall time is what a user waits for; CPU time (all threads of
this process) is also printed because it barely moves when other processes share the cores, so the
ratio of the two modes stays meaningful on a busy machine.

``--host-profile`` instead measures the host work around the networks (``cellsam_ray.bench.host``), and
``--json`` prints that as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cellsam_ray.model import precision
from cellsam_ray.model.boxes import box_score_threshold
from cellsam_ray.model.cellfinder import detector_topk
from cellsam_ray.model.config import CellSAMConfig
from cellsam_ray.model.fast import segment_tiles_fast
from cellsam_ray.model.network import CellSAM, build_cellsam
from cellsam_ray.model.preprocess import detector_input, format_image_shape, normalize_image, resize_to_model
from cellsam_ray.model.reference import segment_tile_reference
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.testing.checks import reference_dir

NOTHING_PASSES = 2.0
"""A ``bbox_threshold`` above any score's reach (the cut is 0.66·threshold + 0.33·mean of centres)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cellsam_ray.bench.model", description=__doc__.splitlines()[0])
    parser.add_argument("--golden", default=None,
                        help="golden data (default: $CELLSAM_REFERENCE_DIR/golden, else ../shared/reference/golden)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available, and cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    parser.add_argument("--v12-tiles", type=int, default=1, help="golden tiles to run through v1.2 (0 skips v1.2)")
    parser.add_argument("--v12-boxes", type=int, default=32, help="boxes per tile passed to the v1.2 decoder")
    parser.add_argument("--v12-repeats", type=int, default=1, help="runs per v1.2 measurement (slow on a CPU)")
    parser.add_argument("--precision", action="append", choices=("tf32", "bf16"), default=[],
                        help="also time fast mode in this precision (repeatable; tf32 on CUDA only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--host-profile", action="store_true",
                        help="measure host work per 1024² tile with ~1,000 cells instead (bench_host)")
    parser.add_argument("--cells", type=int, default=1000, help="cells per tile for --host-profile")
    parser.add_argument("--window", type=int, default=1024, help="window side in pixels for --host-profile")
    parser.add_argument("--json", action="store_true", help="with --host-profile: one JSON line only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.host_profile:
        from cellsam_ray.bench.host import host_profile

        result = host_profile(cells=args.cells, window=args.window, repeats=args.repeats)
        print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
        return

    if args.device == "auto":
        devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    else:
        devices = [args.device]
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads{gpu}")
    golden = Path(args.golden) if args.golden else reference_dir() / "golden"
    cases = json.loads((golden / "cases.json").read_text())
    tiles = [(np.load(golden / f"{case}.input.npy"), bool(meta["normalize"])) for case, meta in sorted(cases.items())]
    for device in devices:
        tiny = load_cellsam(str(golden / "tiny_cellsam.pt"), str(golden / "tiny_config.json"), device=device)
        report(f"tiny (golden checkpoint), {device}", tiny, tiles, {}, device, args.repeats, args.precision)
        if args.v12_tiles:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                v12 = build_cellsam(CellSAMConfig.preset("v1.2")).to(device)
            chosen = tiles[: args.v12_tiles]
            options = {"bbox_threshold": passing_threshold(v12, chosen, args.v12_boxes, device), "iou_threshold": 0.0}
            title = f"v1.2 sizes (random weights, {args.v12_boxes} boxes/tile), {device}"
            report(title, v12, chosen, options, device, args.v12_repeats, args.precision)
            del v12


def report(
    title: str, model: CellSAM, tiles: list[tuple[np.ndarray, bool]], options: dict, device: str, repeats: int,
    precisions: list[str],
) -> None:
    """Print per-tile and per-box times of both modes for ``tiles``."""
    print(f"\n== {title}: {len(tiles)} tile(s), shapes {[t.shape for t, _ in tiles]}")
    modes: dict[str, Callable[[dict], list]] = {
        "reference": lambda opts: [
            segment_tile_reference(tile, model, normalize=norm, device=device, **opts) for tile, norm in tiles
        ],
        "fast": lambda opts: run_fast(model, tiles, device, opts),
    }
    for name in precisions:
        if name == "bf16" or device == "cuda":
            modes[f"fast {name}"] = lambda opts, name=name: run_fast(model, tiles, device, {**opts, "precision_name": name})
    for mode, run in modes.items():
        (wall, cpu), results = best_of(repeats, lambda: run(options))
        (enc_wall, enc_cpu), _ = best_of(repeats, lambda: run({**options, "bbox_threshold": NOTHING_PASSES}))
        boxes = sum(len(r.boxes) for r in results)
        per_box = (wall - enc_wall) / boxes if boxes else float("nan")
        cpu_per_box = (cpu - enc_cpu) / boxes if boxes else float("nan")
        n = len(tiles)
        print(f"{mode:>10}: wall {wall / n:7.3f} s/tile ({n / wall:6.2f} tiles/s), encoders {enc_wall / n:7.3f} s/tile,"
              f" {per_box * 1e3:7.2f} ms/box | cpu {cpu / n:7.3f} s/tile, encoders {enc_cpu / n:7.3f} s/tile,"
              f" {cpu_per_box * 1e3:7.2f} ms/box | {boxes / n:.1f} boxes/tile,"
              f" {np.mean([r.labels.max() for r in results]):.1f} cells/tile")


def run_fast(model: CellSAM, tiles: list[tuple[np.ndarray, bool]], device: str, options: dict) -> list:
    """All tiles in fast mode, batched per normalisation flag, results in tile order."""
    results: dict[int, object] = {}
    precision.configure(options.get("precision_name", "fp32"), device)
    for flag in (True, False):
        chosen = [i for i, (_, n) in enumerate(tiles) if n is flag]
        if chosen:
            out = segment_tiles_fast([tiles[i][0] for i in chosen], model, normalize=flag, device=device, **options)
            results.update(zip(chosen, out))
    precision.configure("fp32", device)
    return [results[i] for i in range(len(tiles))]


def best_of(repeats: int, run: Callable[[], list]) -> tuple[tuple[float, float], list]:
    """((best wall seconds, best process CPU seconds), results of the last run)."""
    wall, cpu, results = float("inf"), float("inf"), []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        results = run()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return (wall, cpu), results


@torch.inference_mode()
def passing_threshold(model: CellSAM, tiles: list[tuple[np.ndarray, bool]], boxes: int, device: str) -> float:
    """A ``bbox_threshold`` that lets about ``boxes`` detections through on every tile (the smallest count)."""
    size = model.sam.image_encoder.img_size
    thresholds = []
    for image, normalize in tiles:
        formatted = format_image_shape(image)
        resized = resize_to_model(normalize_image(formatted) if normalize else formatted, size)
        logits, raw = model.cellfinder(detector_input(resized, adv_mode=model.adv_mode).to(device))
        scores = detector_topk(logits, raw, image_size=(size, size))[0][0].cpu()
        target = float(scores[boxes - 1] + scores[boxes]) / 2  # between the boxes-th and next score
        thresholds.append((target - box_score_threshold(scores, 0.0)) / 0.66)
    return max(thresholds)


if __name__ == "__main__":
    main()
