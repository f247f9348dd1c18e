"""The whole-slide benchmark: how close the pipeline comes to the model alone, and what memory it takes.

Pipeline efficiency = (time the model alone needs for the same tiles, in one process on the same cores,
windows already in memory) ÷ (wall time of ``segment`` on a running Ray cluster). Reading, merging and
writing overlap with the model when it is near 1. Memory is the peak RSS of the driver and of each model
actor; running two slide sizes shows whether it grows with the slide.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from cellsam_ray.driver.api import ensure_ray, segment
from cellsam_ray.driver.windows import plan_run
from cellsam_ray.model.config import load_config
from cellsam_ray.model.network import build_cellsam
from cellsam_ray.pipeline.source import cellsam_segmenter, read_window
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.synth import write_synthetic_slide


def random_checkpoint(config: str, folder: Path, seed: int = 0) -> str:
    """A checkpoint of random weights with the config's sizes (the published ones cannot be fetched here)."""
    path = folder / f"random-{Path(config).stem}.pt"
    if not path.exists():
        torch.manual_seed(seed)
        torch.save(build_cellsam(load_config(config)).state_dict(), path)
    return str(path)


def model_alone_seconds(spec: SegmentSpec) -> tuple[float, int]:
    """Seconds the segmenter needs for the run's tiles in this process, windows read beforehand."""
    plan = plan_run(spec)
    windows = [read_window(plan, t) for t in plan.tiles]
    segmenter = cellsam_segmenter(plan.spec)
    batch = plan.spec.batch_size
    start = time.perf_counter()
    for i in range(0, len(windows), batch):
        segmenter.segment_batch(windows[i : i + batch], origins=[t.origin for t in plan.tiles[i : i + batch]])
    return time.perf_counter() - start, len(windows)


def bench_slide(size: int, config: str, weights: str | None, folder: Path, *, tile: int | None,
                halo: int | None, batch_size: int) -> dict:
    """One slide through the pipeline and through the model alone; windows as ``segment`` decides them
    unless ``tile``/``halo`` are given."""
    url = str(folder / f"slide-{size}.ome.zarr")
    info = write_synthetic_slide(url, size=(size, size), channels=3, ngff="0.5", seed=1, chunk=256)
    weights = weights or random_checkpoint(config, folder)
    spec = SegmentSpec(input=url, nuclear=[info.channel_names[0]], whole_cell=[info.channel_names[1]],
                       weights=weights, config=config, tile=tile, halo=halo, device="cpu",
                       batch_size=batch_size, overwrite=True, tissue_mask=False)
    ensure_ray()
    start = time.perf_counter()
    report = segment(spec, progress=False)
    wall = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    alone, tiles = model_alone_seconds(spec)
    summary = report["summary"]
    return dict(
        slide=f"{size}x{size}", config=config, tiles=tiles, cells=summary["cells"],
        pipeline_wall_s=round(wall, 2), model_alone_s=round(alone, 2),
        efficiency=round(alone / wall, 3),
        tiles_per_s=round(tiles / wall, 4), cells_per_s=round(summary["cells"] / wall, 2),
        model_fraction_of_wall=round(report["model_seconds"] / wall, 3),
        stage_seconds=report["timings"],
        peak_rss_mb=dict(driver=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                         actors=report.get("actor_peak_rss_mb")),
    )


def run_bench(sizes: list[int], config: str, weights: str | None, *, tile: int | None, halo: int | None,
              batch_size: int,
              out: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="cellsam-ray-bench-") as tmp:
        rows = [bench_slide(s, config, weights, Path(tmp), tile=tile, halo=halo, batch_size=batch_size)
                for s in sizes]
    machine = dict(cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                   gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    result = dict(machine=machine, results=rows)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result
