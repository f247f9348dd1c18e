"""A cohort: many slides in one run, one pool of model actors (weights loaded once per actor) for them all.

1. ``driver.slides`` says which slides; the spec's options apply to all, a manifest may name each slide's
   channels.
2. Before any model time the model is checked once and every slide is opened and checked (metadata only,
   several at a time): a missing slide, a channel one slide lacks, ... are all listed at once, and nothing
   runs unless ``skip_bad_slides``. A slide whose label is complete is skipped (``finished_earlier``), so
   rerunning a cohort's spec goes on where it stopped; an unfinished slide resumes from its own work prefix.
3. Slides are planned (surveyed, windows decided, lease taken, finished tiles listed) in a background
   thread, at most ``slides_at_once`` slides held at once, so memory does not grow with the cohort; their
   tiles queue on the one pool (``execution.Loop``) behind those of the slides already in, so the next
   slide's tiles fill the actors while the last one's merge, pyramid, table and QC finish. A slide's
   ending (QC, table, report, listing) runs in another thread while the loop goes on feeding the actors.
4. Each slide stays its own result: its own plan, lease, work prefix, labels, report, table and QC, as a
   one-slide run of the same spec gives. A slide that fails is recorded and the others go on.
5. The cohort report (``driver.cohort_report``) is written at the end, however the run ends.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import fsspec

from cellsam_ray.driver.cohort_report import SlideRow, write_cohort_report
from cellsam_ray.driver.execution import Loop, SlideWork
from cellsam_ray.driver.lifecycle import LabelRun, build_report, complete_label, location, within
from cellsam_ray.driver.model_pool import actor_facts
from cellsam_ray.driver.slides import SlideInput
from cellsam_ray.driver.stats import RunStats
from cellsam_ray.driver.windows import choose_model, plan_run
from cellsam_ray.errors import RunFailed, RunStopped, UserError, one_line
from cellsam_ray.io.storage import join_url
from cellsam_ray.pipeline import labels_out
from cellsam_ray.pipeline.plan import SlidePlan, check_model, check_slide
from cellsam_ray.spec import SegmentSpec

CHECKS_AT_ONCE = 8  # slides opened at once by the check before model time (metadata reads: I/O bound)
SHOWN = 5  # problems shown in a one-line error; the cohort report lists them all
PROGRESS_EVERY_S = 5.0


def slide_spec(spec: SegmentSpec, slide: SlideInput) -> SegmentSpec:
    """The one-slide spec of ``slide``: the cohort's, with its URL and the channel names a manifest gave it."""
    update: dict = dict(input=slide.url)
    if slide.nuclear is not None:
        update["nuclear"] = list(slide.nuclear)
    if slide.whole_cell is not None:
        update["whole_cell"] = list(slide.whole_cell)
    return spec.model_copy(update=update)


def check_cohort(spec: SegmentSpec, specs: list[SegmentSpec]) -> list[SlideRow]:
    """Everything found wrong before model time, all at once: a UserError where the report location is
    inside a slide or the model is unusable; each slide's own problem as an ``invalid`` row (a UserError
    listing them unless ``skip_bad_slides``); a slide already finished as a ``finished_earlier`` row."""
    if not spec.cohort_report:
        raise UserError("a run of several slides writes a cohort report: give --cohort-report FOLDER "
                        "(cohort.parquet and cohort.html go there)")
    report = location(spec.cohort_report)
    for one in specs:
        if within(report, location(one.input)):
            raise UserError(f"--cohort-report {spec.cohort_report} lies inside the slide {one.input}: the input is "
                            "never written; choose a folder outside every slide")
    check_model(choose_model(specs[0])[0])  # once for all: a missing checkpoint fails the cohort, not each slide
    with ThreadPoolExecutor(CHECKS_AT_ONCE) as pool:
        rows = list(pool.map(_checked_row, specs))
    bad = [row for row in rows if row.status == "invalid"]
    if bad and not spec.skip_bad_slides:
        shown = "; ".join(f"{row.url}: {row.error}" for row in bad[:SHOWN])
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise UserError(f"{len(bad)} of {len(specs)} slides cannot be segmented: {shown}{more}. Fix or remove "
                        "them, or pass --skip-bad-slides to segment the others")
    return rows


def _checked_row(spec: SegmentSpec) -> SlideRow:
    row = SlideRow(url=spec.input)
    try:
        checked = check_slide(spec)
    except UserError as err:
        row.status, row.error = "invalid", str(err)
        return row
    except Exception as err:  # noqa: BLE001 - an unreadable slide is this slide's problem, said in one line
        row.status, row.error = "invalid", one_line(err)
        return row
    if complete_label(checked.image, spec.label_name) and not spec.overwrite:
        _earlier_result(row, spec.model_copy(update=dict(input=checked.url)))
    return row


def _earlier_result(row: SlideRow, spec: SegmentSpec) -> None:
    """``row`` as the finished run's report describes it (its label is complete)."""
    row.status = "finished_earlier"
    row.labels = join_url(spec.input, "labels", spec.label_name)
    row.report = join_url(row.labels, "report.json")
    try:
        with fsspec.open(row.report, "rb", **(spec.storage.options() or {})) as f:
            summary = json.loads(f.read()).get("summary") or {}
    except (OSError, ValueError):
        return
    row.cells, row.tiles, row.overview = summary.get("cells"), summary.get("tiles"), summary.get("qc_overview")
    row.tiles_segmented = (summary.get("tiles_segmented") or 0) + (summary.get("tiles_resumed") or 0)


@dataclass
class _Slide:
    """A slide of the cohort that holds a lease: its row, plan, hold on its label and loop state."""

    index: int
    plan: SlidePlan
    run: LabelRun
    work: SlideWork
    started: float
    stats: RunStats


class Cohort:
    """The slides of ``rows`` that are ``not_started`` through one loop (see the module's docstring)."""

    def __init__(self, spec: SegmentSpec, specs: list[SegmentSpec], rows: list[SlideRow], progress: bool) -> None:
        self.spec, self.specs, self.rows, self.progress = spec, specs, rows, progress
        self.queue = deque(i for i, row in enumerate(rows) if row.status == "not_started")
        self.loop = Loop(keep_pool=self._keep_pool)
        self.preparing: dict[Future, int] = {}
        self.finishing: dict[Future, int] = {}
        self.held: dict[int, _Slide] = {}  # id(SlideWork) -> the slide, from planned to finished
        self.planner = ThreadPoolExecutor(1, thread_name_prefix="cohort-plan")
        self.finisher = ThreadPoolExecutor(2, thread_name_prefix="cohort-finish")
        self.tiles_expected = 0  # for the pool's size: the first slide's tiles times the slides to run
        self.last_line = 0.0

    def _held(self) -> int:
        """Slides that hold a lease and driver state: being planned, in the loop, or being finished."""
        return len(self.preparing) + len(self.loop.slides) + len(self.finishing)

    def _keep_pool(self, pool) -> bool:
        """Keep the actors (and their weights) while more slides come; a pool on CPUs only while a slide is
        being planned or may be now: with every slot held by slides whose last stages wait for CPUs its
        actors hold, it must go (the next slide starts a new one)."""
        if pool.on_gpus:
            return bool(self.queue or self.preparing)
        return bool(self.preparing) or (bool(self.queue) and self._held() < self.spec.slides_at_once)

    def run(self) -> None:
        try:
            while self.queue or self.preparing or self.loop.slides or self.finishing:
                while self.queue and self._held() < self.spec.slides_at_once:
                    index = self.queue.popleft()
                    self.preparing[self.planner.submit(self._prepare, index)] = index
                self._take_prepared()
                busy = self.preparing or self.finishing
                for work, err in self.loop.step(timeout=0.2 if busy else 1.0):
                    slide = self.held[id(work)]
                    facts = [] if work.stats.actors else self.loop.actors()
                    self.finishing[self.finisher.submit(self._finish, slide, err, facts)] = slide.index
                self._take_finished()
                if not self.loop.slides and busy:
                    wait([*self.preparing, *self.finishing], timeout=0.5, return_when=FIRST_COMPLETED)
                self._progress_line()
        except BaseException as err:
            self._stop(err)
            raise
        finally:
            self.planner.shutdown()
            self.finisher.shutdown()

    # ------------------------------------------------------------------------------------------ begin
    def _prepare(self, index: int) -> _Slide:
        """Plan the slide, take its label (lease, resume or refuse) and list its finished tiles: off the loop's
        thread, while the actors work on the slides before it."""
        started = time.perf_counter()
        plan = plan_run(self.specs[index], overview_in_a_task=True)
        run = LabelRun(plan)
        run.start()
        stats = RunStats()
        try:
            work = SlideWork(plan, stats, on_segmented=run.swap, writes_wait=run.replaces)
        except BaseException as err:
            run.end(build_report(plan, stats, wall_seconds=time.perf_counter() - started, status="failed",
                                 error=one_line(err)))
            raise
        return _Slide(index, plan, run, work, started, stats)

    def _take_prepared(self) -> None:
        for future in [f for f in self.preparing if f.done()]:
            index = self.preparing.pop(future)
            try:
                slide = future.result()
            except Exception as err:  # noqa: BLE001 - this slide's failure: recorded, the others go on
                self._record(index, status="failed", error=one_line(err))
                continue
            self.rows[index].labels = join_url(slide.plan.spec.input, slide.plan.labels_path)
            if not self.tiles_expected:
                self.tiles_expected = max(len(slide.work.todo), 1) * (1 + len(self.queue) + len(self.preparing))
            self.held[id(slide.work)] = slide
            self.loop.add(slide.work, self.tiles_expected)

    # -------------------------------------------------------------------------------------------- end
    def _finish(self, slide: _Slide, err: BaseException | None, actors: list) -> None:
        """End one slide (in the finisher's thread): QC, table, report and listing if it succeeded, else its
        report and its lease given back; its row filled either way."""
        stats = slide.stats
        if actors:
            stats.actors = actor_facts(actors)
        try:
            if err is None and not stats.failed:
                slide.work.host.close()
                report = build_report(slide.plan, stats, wall_seconds=time.perf_counter() - slide.started)
                slide.run.finish(report)
                where = labels_out.sidecar_url(slide.plan, "report.json")
            else:
                error = one_line(err) if err is not None else (
                    f"{len(stats.failed)} tile(s) failed on every attempt: "
                    + "; ".join(f.describe() for f in stats.failed[:3]))
                report = build_report(slide.plan, stats, wall_seconds=time.perf_counter() - slide.started,
                                      status="failed", error=error)
                where = slide.run.end(report)
        except Exception as failure:  # noqa: BLE001 - its QC, table or listing failed: this slide fails
            report = build_report(slide.plan, stats, wall_seconds=time.perf_counter() - slide.started,
                                  status="failed", error=one_line(failure))
            where = slide.run.end(report)
        self._record(slide.index, report=where, **_row_of(report))

    def _take_finished(self) -> None:
        for future in [f for f in self.finishing if f.done()]:
            index = self.finishing.pop(future)
            self.held = {key: slide for key, slide in self.held.items() if slide.index != index}
            future.result()  # raises only a bug: each slide's own failure is in its row
            if self.progress:
                row, done = self.rows[index], sum(r.status != "not_started" for r in self.rows)
                print(f"cohort: slide {done}/{len(self.rows)} {row.status}: {row.url} ({row.cells or 0} cells, "
                      f"{row.seconds or 0:.1f} s){f': {row.error}' if row.error else ''}", file=sys.stderr, flush=True)

    def _record(self, index: int, **values) -> None:
        for name, value in values.items():
            setattr(self.rows[index], name, value)

    def _stop(self, err: BaseException) -> None:
        """Stopped (Ctrl-C, SIGTERM) or failed as a whole: the actors and tasks ended, every slide that holds
        a lease ends with its report (stopped or failed) and gives its lease back."""
        status = "stopped" if isinstance(err, (RunStopped, KeyboardInterrupt)) else "failed"
        finishing = set(self.finishing.values())
        in_loop = [slide for slide in self.held.values() if slide.index not in finishing]
        self.loop.abort()
        for slide in in_loop:
            report = build_report(slide.plan, slide.stats, wall_seconds=time.perf_counter() - slide.started,
                                  status=status, error=one_line(err))
            self._record(slide.index, report=slide.run.end(report), **_row_of(report))
        for future, index in list(self.preparing.items()):
            try:
                slide = future.result()
            except Exception as failure:  # noqa: BLE001
                self._record(index, status="failed", error=one_line(failure))
                continue
            report = build_report(slide.plan, slide.stats, wall_seconds=0.0, status=status, error=one_line(err))
            self._record(index, report=slide.run.end(report), **_row_of(report))
        wait(list(self.finishing))
        self._take_finished()

    def _progress_line(self) -> None:
        if not self.progress or time.monotonic() - self.last_line < PROGRESS_EVERY_S:
            return
        self.last_line = time.monotonic()
        held = {slide.index: slide.work.progress for slide in self.held.values()}
        ended = [row for i, row in enumerate(self.rows) if row.status != "not_started" and i not in held]
        line = dict(slides_done=len(ended), slides_total=len(self.rows),
                    slides_failed=sum(row.status in ("failed", "invalid") for row in ended),
                    tiles_done=sum(row.tiles_segmented or 0 for row in ended)
                    + sum(progress.tiles_done for progress in held.values()),
                    tiles_planned=sum((row.tiles_segmented or 0) + (row.tiles_failed or 0) for row in ended)
                    + sum(progress.tiles_total for progress in held.values()))
        print("PROGRESS " + json.dumps(line), file=sys.stderr, flush=True)


def _row_of(report) -> dict:
    summary = report.summary
    return dict(status=report.status, cells=summary.cells, tiles=summary.tiles,
                tiles_segmented=summary.tiles_segmented + summary.tiles_resumed, tiles_failed=summary.tiles_failed,
                seconds=summary.wall_seconds, error=report.error, labels=summary.labels, overview=summary.qc_overview)


def run_cohort(spec: SegmentSpec, slides: list[SlideInput], *, connect: Callable[[], None],
               progress: bool = True) -> dict:
    """Segment every slide of ``slides`` with ``spec``'s options in one run (``connect`` joins or starts the
    Ray cluster, once the slides are checked); returns the cohort's summary. Raises ``RunFailed`` (after
    writing the cohort report) when any slide did not finish."""
    specs = [slide_spec(spec, slide) for slide in slides]
    rows = check_cohort(spec, specs)
    cohort = Cohort(spec, specs, rows, progress)
    options = spec.storage.options()
    stopped = False
    try:
        if cohort.queue:
            connect()
            cohort.run()
    except (RunStopped, KeyboardInterrupt):
        stopped = True
    finally:
        where = write_cohort_report(spec.cohort_report, rows, options)
    if stopped:
        raise RunStopped(f"stopped; finished slides and tiles are kept: rerun the same spec to resume (cohort "
                         f"report: {where['html']})")
    counts = {status: sum(row.status == status for row in rows) for status in {row.status for row in rows}}
    summary = dict(slides=len(rows), **counts, cells=sum(row.cells or 0 for row in rows),
                   cohort_report=where["html"], cohort_table=where["parquet"])
    failed = [row for row in rows if row.status in ("failed", "stopped", "not_started")]
    if failed:
        shown = "; ".join(f"{row.url}: {row.error}" for row in failed[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise RunFailed(f"{len(failed)} of {len(rows)} slides did not finish: {shown}{more} (cohort report: "
                        f"{where['html']}); rerun the same spec to retry them: finished slides are skipped")
    return dict(summary=summary, slides=[row.__dict__ for row in rows])
