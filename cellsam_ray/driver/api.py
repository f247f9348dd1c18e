"""The Python API: ``segment(spec)`` does what ``cellsam-ray segment`` does (the CLI and jobs call it)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import ray

from cellsam_ray.driver import stopping
from cellsam_ray.driver.cohort import run_cohort
from cellsam_ray.driver.execution import run_plan
from cellsam_ray.driver.lifecycle import LabelRun, build_report
from cellsam_ray.driver.slides import named_slides
from cellsam_ray.driver.stats import Progress, RunStats
from cellsam_ray.driver.windows import plan_run
from cellsam_ray.errors import RunFailed, RunStopped, UserError, one_line
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.table.write import require_anndata


class ProgressPrinter:
    """A progress bar on a terminal; structured ``PROGRESS {json}`` lines elsewhere (job logs)."""

    def __init__(self, stream=None, every: float = 5.0) -> None:
        self.stream = stream or sys.stderr  # looked up now: a test harness may have replaced it
        self.tty = self.stream.isatty()
        self.every = every
        self.last = 0.0

    def __call__(self, p: Progress) -> None:
        remaining = p.tiles_total - p.tiles_done
        eta = remaining / p.rate if p.rate > 0 else float("nan")
        if self.tty:
            width = 30
            filled = int(width * p.tiles_done / max(p.tiles_total, 1))
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] tiles {p.tiles_done}/{p.tiles_total}"
                f"  cells {p.cells}  {p.rate:.2f} tiles/s  ETA {eta:.0f}s "
            )
            if remaining == 0:
                self.stream.write("\n")
            self.stream.flush()
        elif time.monotonic() - self.last >= self.every or remaining == 0:
            self.last = time.monotonic()
            line = dict(tiles_done=p.tiles_done, tiles_total=p.tiles_total, candidates=p.cells,
                        tiles_per_s=round(p.rate, 3), eta_s=None if eta != eta else round(eta, 1))
            print("PROGRESS " + json.dumps(line), file=self.stream, flush=True)


def ensure_ray() -> None:
    """Join the cluster the environment names (a Ray job, ``RAY_ADDRESS``), else start a local one."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (``cellsam-ray stop``, a cluster shutting down) ends the run like Ctrl-C: as ``RunStopped``
    (raised by the driver's loop, ``driver.stopping``), so its report says ``stopped`` and its lease is
    released. Only the main thread can take signals. Enter it once this process has joined Ray: joining
    installs Ray's own handler, which ends the process at once (exit 1, no report, the lease left to
    expire)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping.clear()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.request())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        stopping.clear()


def segment(spec: SegmentSpec | dict, *, progress: bool = True) -> dict:
    """Segment the slide ``spec`` names and write ``labels/<label_name>`` into it; return the report. A spec
    naming several slides (a list, glob, folder or manifest: ``driver.slides``) runs them as one cohort
    (``driver.cohort``) and returns the cohort's summary and rows."""
    spec = spec if isinstance(spec, SegmentSpec) else SegmentSpec.model_validate(spec)
    spec = spec.with_local_paths_absolute()  # workers run in other folders
    spec.storage.options()  # every variable it names is set here, before anything is read
    if spec.cell_table_h5ad:
        require_anndata()
    slides, is_cohort = named_slides(spec.input, spec.storage.options())
    if is_cohort:
        with ExitStack() as sigterm:
            def connect() -> None:
                ensure_ray()
                sigterm.enter_context(stop_on_sigterm())

            return run_cohort(spec, slides, connect=connect, progress=progress)
    started = time.perf_counter()
    plan = plan_run(spec)  # the model chosen, the slide surveyed and the windows decided, once each
    if plan.cell_size and progress:
        print(f"cell size: {plan.cell_size.describe()}; windows of {plan.grid.window_size} px",
              file=sys.stderr, flush=True)
    run = LabelRun(plan)
    run.start()
    stats = RunStats()
    try:
        ensure_ray()
        with stop_on_sigterm():
            run_plan(plan, ProgressPrinter() if progress else None, on_segmented=run.swap, writes_wait=run.replaces,
                     stats=stats)
    except BaseException as err:
        stopped = isinstance(err, (RunStopped, KeyboardInterrupt))
        report = build_report(plan, stats, wall_seconds=time.perf_counter() - started,
                              status="stopped" if stopped else "failed", error=one_line(err))
        where = run.end(report)
        if stopped:  # before RunFailed, which RunStopped is
            raise RunStopped(f"stopped; the finished tiles are kept: run the same spec again to resume "
                             f"(report: {where})") from None
        if isinstance(err, (UserError, RunFailed)):
            raise
        raise RunFailed(f"{one_line(err)} (report: {where}; the finished tiles are kept: run the same spec again "
                        "to resume)") from err
    report = build_report(plan, stats, wall_seconds=time.perf_counter() - started)
    if stats.failed:
        where = run.end(report)
        shown = "; ".join(f.describe() for f in stats.failed[:3])
        more = f"; and {len(stats.failed) - 3} more" if len(stats.failed) > 3 else ""
        raise RunFailed(f"{len(stats.failed)} tile(s) failed on every attempt: {shown}{more}. The other tiles are "
                        f"kept: rerun the same spec to retry only these (report: {where})")
    run.finish(report)
    return report.model_dump(mode="json")
