"""Running slide plans on Ray: the loop that feeds one model pool and each slide's CPU stages.

- The segment stage is ``driver.model_pool``: one pool of model actors for every slide of a run.
- The reconcile, paint and pyramid stages are CPU tasks; the ids are a prefix sum on the driver over one
  integer per tile. They stream: each unit is submitted as soon as what it reads is final
  (``driver.streaming`` says when), a bounded number at a time, while the model actors go on; an
  overwrite's writes wait for the swap. A task takes a run of neighbouring units (homes of a row, chunks of
  a chunk row) that are ready together, so what they share is decoded once and Ray's per-task cost is paid
  once.
- The cell table is measured in the paint stage; per-tile tasks combine seam pieces as the cores are
  painted, and one small writer actor streams their rows, in id order, to one Parquet file (and the
  cells' outlines, made the same way, to a GeoJSON and a GeoParquet file). The QC
  pictures are one task after the pyramid stage (they need the label pyramid).
- Tasks retry (set explicitly); every write is to a key derived from the tile or chunk alone, so a retry
  rewrites the same bytes. A tile that fails on every attempt is recorded (``RunStats.failed``): nothing
  that reads it is written, the slide ends unfinished (its label unlisted) and a rerun retries only that
  tile, so no tile is ever left silently empty. A stopped or failed run kills its actors and cancels its
  tasks at once.
- ``Loop`` runs several slides at once (a cohort, ``driver.cohort``) with one pool; ``run_plan`` is a loop
  of one slide. A slide's failure (a task that failed every retry, its swap) ends that slide alone.
"""

from __future__ import annotations

import time
from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cellsam_ray.driver import stopping
from cellsam_ray.driver.model_pool import CANDIDATES, TASK_RETRIES, ModelPool
from cellsam_ray.driver.stats import Progress, RunStats
from cellsam_ray.driver.streaming import Streams
from cellsam_ray.merge.objects import CellSet
from cellsam_ray.merge.rasterise import rasterise_core
from cellsam_ray.pipeline import labels_out
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.pipeline.stages import reconcile_tile, with_ids
from cellsam_ray.table import per_tile
from cellsam_ray.table.geo import OutlineLayout
from cellsam_ray.table.schema import TableLayout
from cellsam_ray.table.write import ParquetStream


def _runs(homes: list[tuple[int, int]], most: int) -> list[list[tuple[int, int]]]:
    """``homes`` in raster order, cut into runs of at most ``most`` neighbours along a row: a task takes a
    run, so the inputs that neighbouring homes share are read and decoded once."""
    runs: list[list[tuple[int, int]]] = []
    for home in sorted(homes):
        if runs and len(runs[-1]) < most and runs[-1][-1] == (home[0], home[1] - 1):
            runs[-1].append(home)
        else:
            runs.append([home])
    return runs


def _chunk_runs(chunks: list[tuple], row_of) -> list[list[tuple]]:
    """``(level, chunk)`` pairs cut into runs of at most ``CHUNKS_PER_TASK`` of one level and chunk row,
    in the order given (``row_of`` gives a chunk's row)."""
    runs: list[list[tuple]] = []
    for level, chunk in chunks:
        if runs and len(runs[-1]) < CHUNKS_PER_TASK and runs[-1][0][0] == level \
                and row_of(runs[-1][0][1]) == row_of(chunk):
            runs[-1].append((level, chunk))
        else:
            runs.append([(level, chunk)])
    return runs


def _by_ref(units: list, refs: dict) -> tuple[list, list]:
    """The distinct refs that ``refs`` holds for ``units`` (a task's one result covers a run of units), and
    per unit the position of its ref among them, -1 for a unit without one: a task's arguments name each
    object once, since every ref the driver passes costs it CPU (serialising, counting references)."""
    distinct: dict = {}
    for unit in units:
        if unit in refs:
            distinct.setdefault(refs[unit], len(distinct))
    return list(distinct), [distinct.get(refs[unit], -1) if unit in refs else -1 for unit in units]


@ray.remote(max_retries=TASK_RETRIES)
def _reconcile(plan: SlidePlan, homes: tuple[tuple[int, int], ...]):
    """Reconcile a run of homes; returns their QC counts (fetched by the driver), then every home's kept
    cells as one object (home -> cells: one object per task, not per home, is what keeps the driver's
    CPU per tile low). Each tile's candidates are decoded once."""
    grid, found = plan.grid, {}
    for rc in sorted({rc for home in homes for rc in grid.neighbourhood(*home)}):
        key = grid.tile_at(*rc).key
        found[rc] = CellSet.from_bytes(plan.work.get(CANDIDATES, key)) if key in plan.planned_keys else CellSet()
    counts, kept = [], {}
    for home in homes:
        result = reconcile_tile(home, [found[rc] for rc in grid.neighbourhood(*home)])
        counts.append(dict(cells=len(result.kept), reconciled=result.reconciled, oversized=result.oversized,
                           cut_at_window=result.cut_at_window))
        kept[home] = result.kept
    return counts, kept


@ray.remote(max_retries=TASK_RETRIES)
def _write_cores(plan: SlidePlan, homes: tuple[tuple[int, int], ...], near: tuple[tuple[int, int], ...],
                 offsets: list[int], which: list[int], *kept: dict[tuple[int, int], CellSet]):
    """Paint a run of cores and write each unless it stays empty (its chunks keep the fill value).

    ``near`` are the homes around the run, ``offsets`` theirs, and ``which`` the reconcile result among
    ``kept`` that holds each one's cells (-1 for a home with no cell); each is numbered once for every core
    it reaches. Returns whether each core was written (small, fetched, so a failed write raises on the
    driver) and, with the cell table on, one object: core -> what its cells give the table
    (``per_tile.CoreCells``).
    """
    numbered = {rc: with_ids(kept[i][rc], offset) for rc, offset, i in zip(near, offsets, which) if i >= 0}
    written, sums = [], {}
    for home in homes:
        tile = plan.grid.tile_at(*home)
        cells = [numbered[rc] for rc in plan.grid.neighbourhood(*home) if rc in numbered]
        labels = rasterise_core(tile, cells)
        written.append(bool(labels.any()))
        if written[-1]:
            labels_out.write_core(plan, tile, labels)
        if plan.spec.cell_table:
            sums[home] = per_tile.core_cells(plan, tile, labels, CellSet.concat(cells))
    return (written, sums) if plan.spec.cell_table else written


@ray.remote(max_retries=TASK_RETRIES)
def _cell_rows(layout: TableLayout, outlines: OutlineLayout | None, homes: tuple[tuple[int, int], ...],
               near: tuple[tuple[tuple[int, int], ...], ...], *sums: dict[tuple[int, int], per_tile.CoreCells]):
    """The rows (and outlines) of ``homes`` from what the painted cores ``near`` each gave (the paint tasks'
    results ``sums``)."""
    found = {core: cells for part in sums for core, cells in part.items()}
    return per_tile.rows_of_homes(layout, outlines, list(homes), [list(cores) for cores in near], found)


@ray.remote(max_retries=TASK_RETRIES)
def _qc_images(plan: SlidePlan, counts: dict) -> dict:
    from cellsam_ray.qc.views import write_qc_images  # one task per run: its imports stay out of the others

    return write_qc_images(plan, counts)


@ray.remote(max_retries=TASK_RETRIES)
def _pyramid_chunks(plan: SlidePlan, level: int, chunks: tuple[tuple[int, ...], ...]) -> None:
    for chunk_index in chunks:
        labels_out.build_label_chunk(plan, level, chunk_index)


def _tasks_in_flight() -> int:
    """How many CPU tasks the driver keeps submitted at once: enough to fill the cluster's CPUs twice."""
    return max(8, 2 * int(ray.cluster_resources().get("CPU", 1)))


TASK_PIXELS = 32 * 768 * 768
"""Core pixels of the neighbouring homes a reconcile, write or table task takes at most: 32 of CellSAM's
native 768-px cores. Each task is a submission and a result the one driver thread handles, so fewer, larger
tasks cost the driver less per tile; ``Streams`` holds a run that may still grow until it is this long (or
can grow no more), so tasks are this large on a busy cluster too. A run along a row also decodes fewer
candidate files per home. A task's memory and time grow with its pixels (a reconcile decodes the candidates
of 3 rows of its homes and two more), so smaller tiles make tasks of more homes, not larger tasks
(``homes_per_task``); measurements in notes/pipeline.md."""
HOMES_PER_TASK = 64  # at most, however small the tiles
CHUNKS_PER_TASK = 64  # pyramid chunks of one chunk row a task builds at most (a chunk row of a level comes at once)


def homes_per_task(tile: int) -> int:
    """Homes a task takes at most with ``tile``-px cores: ``TASK_PIXELS`` of them, at most ``HOMES_PER_TASK``."""
    return max(1, min(HOMES_PER_TASK, TASK_PIXELS // (tile * tile)))


class _HostStages:
    """The stages after segment (reconcile, paint, pyramid, table) as CPU tasks, each submitted as soon as
    ``Streams`` says what it reads is final: writes first, then pyramid chunks, then reconciles (what frees
    memory first), neighbouring units of a stage together (``_runs``), at most ``limit`` tasks in flight,
    so the driver and the object store hold what is in flight and the rows near the front, not a task per
    tile. A task that fails on every attempt raises on the driver and fails the run."""

    def __init__(self, plan_ref, plan: SlidePlan, streams: Streams, stats: RunStats, limit: int) -> None:
        self.plan_ref, self.plan, self.streams, self.stats, self.limit = plan_ref, plan, streams, stats, limit
        self.homes = homes_per_task(plan.grid.tile)  # homes a reconcile, write or table task takes at most
        self.in_flight: dict[ray.ObjectRef, tuple] = {}  # ref -> (stage, units)
        self.kept_refs: dict = {}  # home -> the reconcile result holding its kept cells, until no write needs them
        self.sums: dict = {}  # tile row -> painted core -> the paint result holding its sums, until no row needs them
        self.counts: dict = {}  # home -> (cells, reconciled), for the QC pictures
        self.spans: dict[str, list[float]] = {}  # stage -> [first submitted, last finished]
        self.table = None  # (layouts, writer actor, the appends not yet seen done), once writes open

    def _sent(self, stage: str, ref, units: list) -> None:
        self.in_flight[ref] = (stage, units)
        self._counted(stage, units)

    def _counted(self, stage: str, units: list) -> None:
        """One task of ``stage`` taking ``units`` was submitted (the report's spans, tasks and units)."""
        self.spans.setdefault(stage, [time.perf_counter(), 0.0])
        self.stats.tasks[stage] = self.stats.tasks.get(stage, 0) + 1
        self.stats.units[stage] = self.stats.units.get(stage, 0) + len(units)

    def _room(self) -> int:
        """Units that may be handed out now: a full task's worth for every task that may be added, so that a
        busy cluster gets fewer, larger tasks rather than many small ones."""
        return max(self.limit - len(self.in_flight), 0) * self.homes

    def submit(self) -> None:
        """Hand out what may start. Units go as one tuple per argument: Ray's serialiser pickles each tuple
        inside a list on its own, but a tuple of tuples at once."""
        streams, grid, table = self.streams, self.plan.grid, self.plan.spec.cell_table
        for homes in _runs(streams.take_writes(self._room(), self.homes), self.homes):
            near = sorted({rc for home in homes for rc in grid.neighbourhood(*home)})
            kept, which = _by_ref(near, self.kept_refs)
            refs = _write_cores.options(num_returns=2 if table else 1).remote(
                self.plan_ref, tuple(homes), tuple(near), [streams.offsets.get(rc, 0) for rc in near], which, *kept)
            self._sent("write", refs[0] if table else refs, homes)
            for home in homes if table else ():
                self.sums.setdefault(home[0], {})[home] = refs[1]
        for run in _chunk_runs(streams.take_chunks(self._room()), streams.row_of_chunk):
            self._sent("pyramid", _pyramid_chunks.remote(self.plan_ref, run[0][0], tuple(c for _, c in run)), run)
        for homes in _runs(streams.take_reconciles(self._room(), self.homes), self.homes):
            counts, kept = _reconcile.options(num_returns=2).remote(self.plan_ref, tuple(homes))
            for home in homes:
                self.kept_refs[home] = kept
            self._sent("reconcile", counts, homes)
        for home in streams.released:
            self.kept_refs.pop(home, None)
        streams.released.clear()
        if table and streams.writes_open:
            self._table_rows()

    def _start_table(self) -> tuple:
        """The table's one writer; it creates the file beside the labels, so only once writes may start."""
        plan = self.plan
        layouts = per_tile.layouts(plan)
        h5ad = labels_out.sidecar_url(plan, "cells.h5ad") if plan.spec.cell_table_h5ad else None
        outlines = (labels_out.sidecar_url(plan, "cells.geojson"), labels_out.sidecar_url(plan, "cells.geoparquet"),
                    layouts[1]) if layouts[1] else None
        # No CPU reserved: its work is small, and for the run's whole length a fractional reservation would
        # keep a whole CPU task from every node it sits on. On the driver's node: the table's rows live in
        # this one actor until the file is closed, and a worker node may go (the run survives that); the
        # driver's node going ends the run anyway.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        writer = ray.remote(ParquetStream).options(num_cpus=0, scheduling_strategy=here).remote(
            labels_out.sidecar_url(plan, "cells.parquet"), plan.spec.storage, layouts[0], h5ad, plan.spec.label_name,
            outlines)
        return layouts, writer, []

    def _table_rows(self) -> None:
        """Rows of the cores the table may take, appended in raster (= id) order to the one writer."""
        self.table = self.table or self._start_table()
        layouts, writer, appends = self.table
        grid = self.plan.grid
        homes = self.streams.take_table_rows(self.homes)
        if homes:
            near = tuple(tuple(rc for rc in grid.neighbourhood(*home) if rc in self.sums.get(rc[0], ()))
                         for home in homes)
            sums = dict.fromkeys(self.sums[rc[0]][rc] for cores in near for rc in cores)  # each object once
            appends.append(writer.append.remote(_cell_rows.remote(*layouts, tuple(homes), near, *sums)))
            self._counted("cell_table", homes)
        position = self.streams.table_position  # rows to come need the sums of its row and the one above
        for row in [r for r in self.sums if position is None or r < position[0] - 1]:
            del self.sums[row]
        if len(appends) > 2 * self.limit:  # now and then: raise an append that failed, forget the done
            done, appends[:] = ray.wait(appends, num_returns=len(appends), timeout=0)
            ray.get(done)

    def finished(self, ref) -> None:
        stage, units = self.in_flight.pop(ref)
        values = ray.get(ref)  # per unit: reconcile counts, whether a core was written; None for pyramid
        self.spans[stage][1] = time.perf_counter()
        if stage == "pyramid":
            for level, chunk in units:
                self.streams.chunk_built(level, chunk)
        elif stage == "write":
            for home, written in zip(units, values):
                self.streams.core_written(home, written)
        else:
            stats = self.stats
            for home, value in zip(units, values):
                stats.cells += value["cells"]
                stats.reconciled += value["reconciled"]
                stats.oversized += value["oversized"]
                stats.cut_at_window += value["cut_at_window"]
                self.counts[home] = (value["cells"], value["reconciled"])
                self.streams.counted(home, value["cells"])

    def drain(self) -> None:
        """Wait for what is in flight, whatever its outcome: nothing of this run writes after it ends."""
        if self.in_flight:
            ray.wait(list(self.in_flight), num_returns=len(self.in_flight))
            self.in_flight.clear()
        if self.table:
            ray.kill(self.table[1])

    def cancel(self, wait_s: float = 5) -> None:
        """End what is in flight now (a stopped or failed run): its worker processes are killed, so no task
        of this run writes after the lease is given back. What a killed write left half done is rewritten
        by the run that resumes (every core and chunk is written again; only tile results are kept)."""
        refs = list(self.in_flight)
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except (ValueError, TypeError, ray.exceptions.RayError):
                pass  # already finished
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        self.in_flight.clear()
        if self.table:
            ray.kill(self.table[1])

    def close(self) -> None:
        """The QC pictures, then the cell table's last rows: once every level is built."""
        qc = _qc_images.remote(self.plan_ref, self.counts) if self.plan.spec.qc_images else None
        if self.plan.spec.cell_table:
            self._table_rows()  # the last rows; a slide without cells still gets its (empty) table
            _, writer, appends = self.table
            ray.get(appends)
            self.stats.cell_table = ray.get(writer.close.remote())
            ray.kill(writer)
            self.spans.setdefault("cell_table", [time.perf_counter(), 0.0])[1] = time.perf_counter()
        if qc:
            self.stats.qc = ray.get(qc)
        for stage, (first, last) in self.spans.items():
            self.stats.stage_seconds[stage] = max(last - first, 0.0)


class SlideWork:
    """One slide in the loop: its plan (in the object store once), the tiles it has left to segment, its
    streamed stages, and what it counts. ``on_segmented`` is called once every tile is segmented (and
    persisted); with ``writes_wait`` nothing is written into the label image before it returns (an
    overwrite swaps the old result out there)."""

    def __init__(self, plan: SlidePlan, stats: RunStats, *, on_segmented: Callable[[], None] | None = None,
                 writes_wait: bool = False) -> None:
        self.plan, self.stats, self.on_segmented = plan, stats, on_segmented
        self.plan_ref = ray.put(plan)  # once, into the object store; every task and actor gets the reference
        finished = plan.work.done(CANDIDATES)
        self.todo = [t for t in plan.tiles if t.key not in finished]
        self.outstanding = {t.key for t in self.todo}  # emptied by the model pool as tiles are segmented
        self.progress = Progress(tiles_total=len(plan.tiles), tiles_done=len(plan.tiles) - len(self.todo))
        self.progress.tiles_resumed = stats.tiles_resumed = self.progress.tiles_done
        self.streams = Streams(plan, set(finished))
        if not writes_wait:
            self.streams.open_writes()
        self.host = _HostStages(self.plan_ref, plan, self.streams, stats, _tasks_in_flight())
        self.started = time.perf_counter()
        self.segmented = False  # every tile segmented, the swap done

    def all_segmented(self) -> None:
        self.stats.stage_seconds["segment"] = time.perf_counter() - self.started
        self.stats.tasks["segment_batches"] = self.stats.batches
        self.stats.tasks["segment_calls"] = self.stats.calls
        if self.on_segmented is not None:
            self.on_segmented()
        if not self.streams.writes_open:
            self.streams.open_writes()
        self.segmented = True


class Loop:
    """The driver's event loop over the slides in flight: one model pool for all of them, and each slide's
    CPU stages streamed behind its tiles. ``step`` until every slide has left.

    The pool is closed once no slide has a tile left, unless ``keep_pool(pool)`` says that more tiles come
    (a cohort's next slides) and that they may come while the pool stands: a pool on CPUs holds the CPUs
    the slides' remaining stages need. Each slide's stages overlap, so its report's per-stage seconds are
    each stage's span, from its first task submitted to its last finished."""

    def __init__(self, on_progress: Callable[[SlideWork], None] | None = None,
                 keep_pool: Callable[[ModelPool], bool] = lambda pool: False) -> None:
        self.slides: list[SlideWork] = []
        self.pool: ModelPool | None = None
        self.sizing = None  # how many actors of what, decided once for the run (``capacity.Pool``)
        self.on_progress, self.keep_pool = on_progress, keep_pool

    def add(self, slide: SlideWork, tiles_expected: int | None = None) -> None:
        """Take ``slide`` in; its tiles queue behind those of the slides already in. A new pool is sized
        for ``tiles_expected`` (default: this slide's)."""
        self.slides.append(slide)
        if slide.todo:
            if self.pool is None:
                self.pool = ModelPool(slide.plan, tiles_expected or len(slide.todo), self.sizing)
                self.sizing = self.pool.sizing
            self.pool.add(slide, slide.todo)
        slide.stats.pool = self.sizing

    def step(self, timeout: float = 1.0) -> list[tuple[SlideWork, BaseException | None]]:
        """Hand out what may go, wait up to ``timeout`` for something to finish and take it (short: a SIGTERM
        is taken between waits, and ``ray job stop`` kills the driver 3 s after it). Returns the
        slides that left: (slide, None) when it is streamed or its failed tiles end it (``stats.failed``;
        its finished tiles are persisted, a rerun retries the rest), (slide, error) when it failed. A
        failure of the pool itself (actors that cannot start) raises."""
        stopping.check()  # a SIGTERM taken since the last pass
        ended: list[tuple[SlideWork, BaseException | None]] = []
        if self.pool is not None and not any(s.outstanding for s in self.slides) and not self.keep_pool(self.pool):
            facts = self.pool.close()
            for slide in self.slides:
                slide.stats.actors = list(facts)
            self.pool = None
        for slide in [s for s in self.slides if not s.segmented and not s.outstanding]:
            if slide.stats.failed:
                slide.host.drain()
                self.slides.remove(slide)
                ended.append((slide, None))
                continue
            try:
                slide.all_segmented()
            except Exception as err:  # noqa: BLE001 - this slide's failure (its swap), not the run's
                ended.append(self._fail(slide, err))
        if self.pool is not None:
            self.pool.fill()
        for slide in list(self.slides):
            try:
                slide.host.submit()
            except Exception as err:  # noqa: BLE001
                ended.append(self._fail(slide, err))
                continue
            if slide.segmented and not slide.host.in_flight:
                if not slide.streams.complete:
                    raise RuntimeError("the streamed stages ended before every region was written (a bug in "
                                       "driver.streaming)")
                self.slides.remove(slide)
                ended.append((slide, None))
        if ended:
            return ended
        waiting = (self.pool.waiting() if self.pool is not None else []) + [
            ref for slide in self.slides for ref in slide.host.in_flight]
        if not waiting:
            return ended
        ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        stopping.check()
        for ref in ready:
            if self.pool is not None and self.pool.owns(ref):
                touched = {}
                for slide, key in self.pool.take(ref):
                    slide.streams.tile_segmented(key)
                    touched[id(slide)] = slide
                for slide in touched.values() if self.on_progress else ():
                    self.on_progress(slide)
                continue
            slide = next((s for s in self.slides if ref in s.host.in_flight), None)
            if slide is None:  # its slide failed on an earlier ref of this pass
                continue
            try:
                slide.host.finished(ref)
            except Exception as err:  # noqa: BLE001 - a task that failed every retry fails its slide
                ended.append(self._fail(slide, err))
        return ended

    def _fail(self, slide: SlideWork, err: BaseException) -> tuple[SlideWork, BaseException]:
        """``slide`` failed: its tasks in flight are ended, its queued tiles dropped; the others go on."""
        slide.host.cancel()
        if self.pool is not None:
            self.pool.drop(slide)
        self.slides.remove(slide)
        return slide, err

    def actors(self) -> list:
        """The model actors that have started (for their facts), none once the pool is closed."""
        return self.pool.ready_actors() if self.pool is not None else []

    def abort(self) -> None:
        """Stopped, or failed as a whole: the actors ended, every slide's tasks in flight cancelled."""
        if self.pool is not None:
            self.pool.kill()  # no more tiles, and the CPUs they held go to ending the tasks
            self.pool = None
        for slide in self.slides:
            slide.host.cancel()
        self.slides.clear()


def run_plan(plan: SlidePlan, on_progress: Callable[[Progress], None] | None = None, *,
             on_segmented: Callable[[], None] | None = None, writes_wait: bool = False,
             stats: RunStats | None = None) -> RunStats:
    """Run every stage of one slide, streaming: a region is reconciled, painted and pyramided as soon as
    the tiles it reads are segmented, while the model actors go on (``SlideWork`` says what
    ``on_segmented`` and ``writes_wait`` do). ``stats`` (filled as the run goes, so a caller sees how far
    a failed run came) is returned."""
    stats = RunStats() if stats is None else stats
    loop = Loop(on_progress=(lambda slide: on_progress(slide.progress)) if on_progress else None)
    try:
        slide = SlideWork(plan, stats, on_segmented=on_segmented, writes_wait=writes_wait)
        loop.add(slide)
        while True:
            for _, err in loop.step():
                if err is not None:
                    raise err
                if not stats.failed:
                    slide.host.close()
                return stats
    except BaseException:
        loop.abort()
        raise
