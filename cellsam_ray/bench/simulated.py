"""A cohort on simulated GPUs: does the driver, or do the CPU stages, keep ``gpus`` GPUs busy? (issue 27)

A Ray node declares ``gpus`` GPUs (Ray pins one model actor to each; none exist), and ``SimulatedGPU``
stands in for CellSAM: it takes ``seconds_per_tile`` per window, as a GPU would (sleeping, so it costs
next to no CPU), and returns the same grid of round cells in every window, so the stages after it have
cells to reconcile, paint, pyramid and measure. The bench runs one cohort (its driver a subprocess, whose CPU
time is read when it ends) and reports the tiles/s offered (``gpus / seconds_per_tile``) against those achieved, how
busy the simulated GPUs were, the driver's CPU (its share of one core: a one-threaded loop saturates at
1.0) and the core-seconds per tile of every other process (CPU stages, actors' host work, Ray). Numbers,
machine and what they predict for 8, 32 and 100 GPUs: ``notes/pipeline.md``.

    python -m cellsam_ray.bench.simulated --gpus 8 --slides 4 --size 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cellsam_ray.bench.merge import TreeCPU
from cellsam_ray.testing.cluster import RayNodes, safe_ray_environment

SIMULATED = "cellsam_ray.bench.simulated:SimulatedGPU"
NO_AUTH = {**safe_ray_environment(), "RAY_AUTH_MODE": "disabled"}  # a loopback cluster of a bench alone


class SimulatedGPU:
    """A segmenter that takes a GPU's time and returns a fixed grid of cells ``diameter`` px wide."""

    def __init__(self, seconds_per_tile: float = 0.05, diameter: int = 12, spacing: int = 24) -> None:
        self.seconds_per_tile, self.diameter, self.spacing = seconds_per_tile, diameter, spacing
        self.results: dict[tuple[int, int], dict] = {}  # window shape -> its cells, made once

    def _cells(self, shape: tuple[int, int]) -> dict:
        if shape not in self.results:
            d, boxes, masks = self.diameter, [], []
            yy, xx = np.mgrid[:d, :d]
            disc = (yy - (d - 1) / 2) ** 2 + (xx - (d - 1) / 2) ** 2 <= (d / 2) ** 2
            for y in range(self.spacing // 2, shape[0] - d, self.spacing):
                for x in range(self.spacing // 2, shape[1] - d, self.spacing):
                    boxes.append([x, y, x + d, y + d])
                    masks.append(disc)
            self.results[shape] = dict(boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
                                       scores=np.full(len(boxes), 0.9), masks=masks)
        return self.results[shape]

    def segment_batch(self, windows: list[np.ndarray], *, origins: list) -> list[dict]:
        time.sleep(self.seconds_per_tile * len(windows))
        return [self._cells(window.shape[-2:]) for window in windows]

    def segment(self, window: np.ndarray, *, origin: tuple[int, int]) -> dict:
        return self.segment_batch([window], origins=[origin])[0]


def measure(gpus: int, slides: int, size: int, tile: int, seconds_per_tile: float, cpus: int, folder: Path) -> dict:
    from cellsam_ray.synth import write_synthetic_slide

    for i in range(slides):
        write_synthetic_slide(str(folder / f"slide{i}.ome.zarr"), size=(size, size), channels=2, ngff="0.5",
                              seed=i, chunk=512)
    argv = ["segment", str(folder / "slide*.ome.zarr"), "--nuclear", "DAPI", "--segmenter", SIMULATED,
            "--segmenter-option", f"seconds_per_tile={seconds_per_tile}", "--tile", str(tile), "--halo", "32",
            "--chunk", str(tile), "--no-tissue-mask", "--no-qc-images", "--label-name", "simulated",
            "--cohort-report", str(folder / "report"), "--no-progress",
            "--cpus-per-worker", "0.05"]  # a simulated GPU's actor needs next to no CPU: the node's go to the stages
    with RayNodes(cpus=(cpus,), gpus=(gpus,), env=NO_AUTH) as cluster:
        env = {**os.environ, **NO_AUTH, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}"}
        with TreeCPU() as tree:
            before, started = _children_cpu(), time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "cellsam_ray.cli", *argv], env=env, capture_output=True,
                                  text=True)
            wall, driver = time.perf_counter() - started, _children_cpu() - before
    if done.returncode:
        raise SystemExit(f"the cohort failed: {done.stderr.strip().splitlines()[-1:]}")
    rows = pq.read_table(folder / "report" / "cohort.parquet").to_pylist()
    reports = [json.loads(Path(row["report"]).read_text()) for row in rows]
    tiles = sum(r["summary"]["tiles_segmented"] for r in reports)
    model_seconds = sum(r["model_seconds"] for r in reports)
    return dict(gpus=gpus, cluster_cpus=cpus, slides=slides, size=size, tile=tile, tiles=tiles,
                seconds_per_tile=seconds_per_tile, wall_s=round(wall, 1),
                offered_tiles_per_s=round(gpus / seconds_per_tile, 1), achieved_tiles_per_s=round(tiles / wall, 1),
                gpu_busy=round(model_seconds / (gpus * wall), 3),
                driver_cpu_s=round(driver, 2), driver_cpu_ms_per_tile=round(1000 * driver / tiles, 2),
                driver_core_share=round(driver / wall, 3),
                other_core_s_per_tile=round((tree.seconds - driver) / tiles, 4),
                other_processes=tree.by_process())


def _children_cpu() -> float:
    """CPU seconds of this process's children that have ended (the driver, once it returns)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the node declares (none exist)")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--seconds-per-tile", type=float, default=0.05, help="a GPU's time per tile (H100: ~0.05)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs the node declares")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="simulated-gpus-") as folder:
        print(json.dumps(measure(args.gpus, args.slides, args.size, args.tile, args.seconds_per_tile, args.cpus,
                                 Path(folder)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
