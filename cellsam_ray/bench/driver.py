"""How much CPU the driver spends per tile, and where: the ceiling on how many GPUs one run can keep fed.

The driver's event loop is one Python thread: at ``d`` seconds of driver CPU per tile it hands out at most
``1/d`` tiles per second, whatever the cluster. This runs ``segment`` in this process (so this process is
the driver) on a dense ``size``² synthetic slide with the ground-truth segmenter standing in for the model,
and reads this process's own CPU time (``getrusage(RUSAGE_SELF)``: every thread of the driver, Ray's core
worker included; the actors and tasks are other processes). With ``--profile`` it also profiles the
driver's main thread (``cProfile``) and prints where the time went. Numbers and machine: ``notes/pipeline.md``.

    python -m cellsam_ray.bench.driver --size 8192 --tile 256               # 1,024 tiles
    python -m cellsam_ray.bench.driver --size 8192 --tile 256 --profile driver.prof
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import tempfile
import time
from pathlib import Path

from cellsam_ray.bench.merge import DENSE_ROLES, ORACLE, dense_slide
from cellsam_ray.driver.api import ensure_ray, segment


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(size: int, tile: int, folder: Path, profile: str | None = None, top: int = 25) -> dict:
    """One run on a fresh ``size``² slide with ``tile``-px cores (a 32-px halo): driver CPU per tile."""
    url, _, truth = dense_slide(folder, size, "driver")
    ensure_ray()
    spec = dict(input=url, **DENSE_ROLES, segmenter=ORACLE, segmenter_options=dict(labels=str(truth)),
                tile=tile, halo=32, chunk=tile, tissue_mask=False, label_name="driver")
    profiler = cProfile.Profile() if profile else None
    started, cpu = time.perf_counter(), cpu_seconds()
    if profiler:
        profiler.enable()
    report = segment(spec, progress=False)
    if profiler:
        profiler.disable()
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - started
    tiles = report["summary"]["tiles_segmented"]
    result = dict(slide=f"{size}x{size}", tile=tile, tiles=tiles, cells=report["summary"]["cells"],
                  wall_s=round(wall, 2), driver_cpu_s=round(cpu, 2), driver_cpu_ms_per_tile=round(1000 * cpu / tiles, 2),
                  profiled=bool(profiler))
    if profiler:
        profiler.dump_stats(profile)
        stats = pstats.Stats(profiler)
        for order in ("tottime", "cumulative"):
            print(f"--- driver main thread, top {top} by {order} (cProfile slows it: compare CPU without --profile)")
            stats.sort_stats(order).print_stats(top)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cellsam_ray.bench.driver", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="Slide side in pixels (default 8192).")
    parser.add_argument("--tile", type=int, default=256, help="Tile core in pixels (default 256).")
    parser.add_argument("--profile", metavar="FILE", help="Also profile the driver's main thread into FILE.")
    parser.add_argument("--top", type=int, default=25, help="Functions printed from the profile (default 25).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cellsam-ray-driver-") as folder:
        print(json.dumps(measure(args.size, args.tile, Path(folder), args.profile, args.top)))


if __name__ == "__main__":
    main()
