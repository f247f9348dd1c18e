"""How much CPU the driver spends per tile, and where: the ceiling on how many GPUs one run can keep fed.

The driver's event loop is one Python thread: at ``d`` seconds of driver CPU per tile it hands out at most
``1/d`` tiles per second, whatever the cluster. This runs ``segment`` in this process (so this process is
the driver) on a dense ``size``² synthetic slide with the ground-truth segmenter standing in for the model,
and reads this process's own CPU time (``getrusage(RUSAGE_SELF)``: every thread of the driver, Ray's core
worker included; the actors and tasks are other processes), split by thread name (Linux's
``/proc/self/task``; threads that ended during the run are counted together). With ``--profile`` it also
profiles the driver's main thread (``cProfile``) and prints where the time went. Numbers and machine:
``notes/pipeline.md``.

    python -m cellsam_ray.bench.driver --size 8192 --tile 256               # 1,024 tiles
    python -m cellsam_ray.bench.driver --size 8192 --tile 256 --profile driver.prof
    python -m cellsam_ray.bench.driver --size 16384 --slides /tmp/driver-slides   # keeps the slide for reruns
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from cellsam_ray.bench.merge import DENSE_ROLES, ORACLE, dense_slide
from cellsam_ray.driver.api import ensure_ray, segment


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu() -> dict[int, tuple[str, float]]:
    """Thread id -> (name, CPU seconds) of every live thread of this process; empty where Linux's
    ``/proc/self/task`` is missing."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return threads
    for tid in tids:
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        threads[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / ticks)  # utime, stime
    return threads


def by_thread(before: dict, after: dict, total: float) -> dict[str, float]:
    """CPU seconds per thread name between two ``thread_cpu`` readings; what threads that ended in between
    used is the rest of ``total``."""
    used: Counter[str] = Counter()
    for tid, (name, seconds) in after.items():
        used[name] += seconds - before.get(tid, (name, 0.0))[1]
    used["(ended threads)"] = total - sum(used.values())
    return {name: round(seconds, 2) for name, seconds in used.most_common()}


def slide_in(folder: Path, size: int) -> tuple[str, Path]:
    """The ``size``² dense slide and its truth in ``folder``, written there unless an earlier run did."""
    url, truth = folder / f"driver-{size}.ome.zarr", folder / f"driver-truth-{size}.npy"
    if not truth.exists():
        url, _, truth = dense_slide(folder, size, "driver")
    return str(url), truth


def measure(size: int, tile: int, folder: Path, profile: str | None = None, top: int = 25) -> dict:
    """One run on the ``size``² slide in ``folder`` with ``tile``-px cores (a 32-px halo), writing a label
    image of its own (so no run resumes another): driver CPU per tile."""
    url, truth = slide_in(folder, size)
    ensure_ray()
    spec = dict(input=url, **DENSE_ROLES, segmenter=ORACLE, segmenter_options=dict(labels=str(truth)),
                tile=tile, halo=32, chunk=tile, tissue_mask=False, label_name=f"driver-{time.time_ns()}")
    profiler = cProfile.Profile(time.thread_time) if profile else None  # the main thread's CPU, not its waits
    started, cpu, threads = time.perf_counter(), cpu_seconds(), thread_cpu()
    if profiler:
        profiler.enable()
    report = segment(spec, progress=False)
    if profiler:
        profiler.disable()
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - started
    threads = by_thread(threads, thread_cpu(), cpu) if threads else {}
    tiles = report["summary"]["tiles_segmented"]
    result = dict(slide=f"{size}x{size}", tile=tile, tiles=tiles, cells=report["summary"]["cells"],
                  wall_s=round(wall, 2), driver_cpu_s=round(cpu, 2), driver_cpu_ms_per_tile=round(1000 * cpu / tiles, 2),
                  driver_cpu_s_by_thread=threads, profiled=bool(profiler))
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
    parser.add_argument("--slides", metavar="DIR", type=Path,
                        help="Keep the generated slide in DIR and reuse it in later runs (default: a temporary "
                             "folder; a 16384² slide takes minutes to write).")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        folder = args.slides or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cellsam-ray-driver-")))
        folder.mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure(args.size, args.tile, folder, args.profile, args.top)))


if __name__ == "__main__":
    main()
