"""Running a slide plan on Ray: every actor, task, retry and resource request lives here.

- The segment stage runs in a pool of model actors (one model each; ``num_gpus`` when the cluster has GPUs
  or its autoscaler can add them: ``capacity``). An actor gets tiles once it has started, so a run begins
  with the first actor ready and grows as nodes join; actors that never find room hold no tiles. Tile
  descriptors travel, not pixels: an actor reads its own windows in a thread while its previous batch is
  on the model (``max_concurrency=2``), and the driver keeps two batches in flight per actor. An actor
  writes a batch's candidates to the work store itself, after releasing the model to the other batch in
  flight, so a batch the driver sees finished is persisted (no task per tile to schedule).
- The reconcile, paint and pyramid stages are CPU tasks; the ids are a prefix sum on the driver over one
  integer per tile. They stream: each unit is submitted as soon as what it reads is final
  (``driver.streaming`` says when), a bounded number at a time, while the model actors go on; an
  overwrite's writes wait for the swap. A task takes a run of neighbouring units (homes of a row, chunks of
  a chunk row) that are ready together, so what they share is decoded once and Ray's per-task cost is paid
  once.
- The cell table is measured in the paint stage; per-tile tasks combine seam pieces as the cores are
  painted, and one small writer actor streams their rows, in id order, to one Parquet file. The QC
  pictures are one task after the pyramid stage (they need the label pyramid).
- Actors restart and tasks retry (set explicitly: Ray's defaults for actors are 0); every write is to a
  key derived from the tile or chunk alone, so a retry rewrites the same bytes. A batch held too long (an
  actor waiting for room to restart after its node was lost, or a straggler) is also given to an idle
  actor once the queue is empty; the first copy to finish counts.
- A batch that still fails is retried tile by tile; a tile that fails on every attempt is recorded
  (``RunStats.failed``): nothing that reads it is written, the run ends unfinished (its label unlisted)
  and a rerun retries only that tile, so no tile is ever left silently empty. Device out of memory halves
  an actor's batch, down to one tile, and shrinks CellSAM's decoder chunk; a sticky CUDA error ends the
  actor's process, so Ray restarts it with a fresh context. A stopped or failed run kills its actors and
  cancels its tasks at once.
"""

from __future__ import annotations

import resource
import statistics
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import ray

from cellsam_ray import device
from cellsam_ray.driver import capacity
from cellsam_ray.driver.stats import Progress, RunStats
from cellsam_ray.driver.streaming import Streams
from cellsam_ray.errors import RunFailed, UserError, one_line
from cellsam_ray.merge.objects import CellSet
from cellsam_ray.merge.rasterise import rasterise_core
from cellsam_ray.pipeline import labels_out, source
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.pipeline.stages import Inferred, finish_tiles, reconcile_tile, run_model, with_ids
from cellsam_ray.report import TileFailure
from cellsam_ray.table import per_tile
from cellsam_ray.table.measure import CellSums
from cellsam_ray.table.schema import TableLayout
from cellsam_ray.table.write import ParquetStream

CANDIDATES = "candidates"
ACTOR_RESTARTS = 3
TASK_RETRIES = 3
TILE_LOSSES = 3
"""A tile alone in a batch whose actor was lost this many times fails (it kills its actor: out of host memory,
a crash in native code); before that, losing an actor is not the tile's fault (its node went away)."""


def _use_assigned_cpus() -> None:
    """Give torch the CPUs Ray assigned to this actor: Ray sets OMP_NUM_THREADS to 1 for fractional
    shares (1.75 CPUs gives 1 thread), which would leave a core idle on a CPU-only node. Only a segmenter
    that imported torch pays for it (called after building the segmenter, before it runs)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, round(cpus)))


class SegmentWorker:
    """One model; segments batches of tiles, reading the next batch's windows while one is on the model."""

    def __init__(self, plan: SlidePlan) -> None:
        self.plan = plan
        self.gpus = [str(gpu) for gpu in ray.get_gpu_ids()]  # what Ray pinned it to (CUDA_VISIBLE_DEVICES)
        holder = (f"the model actor on node {ray.util.get_node_ip_address()} holding GPU {', '.join(self.gpus)}"
                  if self.gpus else None)
        self.unusable = None  # why this node cannot run the model (no CUDA for its GPU, ...), said by started()
        try:
            self.segmenter = source.build_segmenter(plan, gpu_holder=holder)
        except UserError as err:  # raised here, it would end the process with a native crash dump on the driver
            self.segmenter, self.unusable = None, str(err)
        _use_assigned_cpus()
        self.readers = ThreadPoolExecutor(max_workers=4)
        self.model_lock = threading.Lock()
        self.batch_limit = plan.spec.batch_size  # lowered for good after a CUDA out-of-memory error

    @ray.method(retry_exceptions=True)  # a transient error (a storage hiccup) costs a retry, not the tile
    def run(self, tiles: list) -> list[tuple[str, int, float]]:
        if self.unusable:  # restarted on a node that cannot run the model
            raise RuntimeError(self.unusable)
        windows = source.read_windows(self.plan, tiles)
        try:
            with self.model_lock:
                inferred = self._infer(tiles, windows)
            # Host work (the segmenter's cleanup, the candidates) outside the lock: the other batch in
            # flight has the model meanwhile.
            results = [r for part, done in inferred for r in finish_tiles(self.plan, part, done)]
        except Exception as err:
            device.exit_if_device_broken(err)
            raise
        list(self.readers.map(lambda r: self.plan.work.put(CANDIDATES, r[1].key, r[0].to_bytes()), results))
        return [(o.key, o.candidates, o.model_seconds) for _, o in results]

    def _infer(self, tiles: list, windows: list) -> list[tuple[list, Inferred]]:
        """The model's part of the segment stage in sub-batches of at most ``batch_limit`` tiles; out of device memory
        halves the limit and shrinks the segmenter's own work (``device.run_shrinking``), and the lower
        sizes stay for this actor's later batches."""
        def run(part: list) -> Inferred:
            return run_model(self.segmenter, [t for t, _ in part], [w for _, w in part])

        done, self.batch_limit = device.run_shrinking(list(zip(tiles, windows)), self.batch_limit, run,
                                                      getattr(self.segmenter, "on_out_of_memory", None))
        return [([t for t, _ in part], inferred) for part, inferred in done]

    @ray.method(concurrency_group="control")  # answers while both batch threads are busy
    def started(self) -> dict:
        """Its node, and why it cannot run the model (None if it can): asked when it is created, and again
        when another actor of its node was lost, its answer saying that it runs (a constructor that failed
        fails this call)."""
        return dict(node=ray.get_runtime_context().get_node_id(), unusable=self.unusable)

    @ray.method(concurrency_group="control")
    def facts(self) -> dict:
        """Where it runs (node, the GPUs Ray gave it, the segmenter's device) and its peak memory so far."""
        return dict(node=ray.get_runtime_context().get_node_id(), gpus=self.gpus,
                    device=getattr(self.segmenter, "device", None),
                    peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def _failure_line(err: BaseException) -> str:
    """What went wrong, in one line: the segmenter's own exception rather than Ray's wrapper."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    if cause is not None:
        return one_line(cause)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed:
        return last  # the constructor's own exception, e.g. "KeyError: 'X'"
    return f"{type(err).__name__}: {last}"


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


def _returns(refs, n: int) -> list:
    """A task's ``n`` return refs as a list (Ray gives one ref, not a list, when ``n`` is 1)."""
    return [refs] if n == 1 else list(refs)


@ray.remote(max_retries=TASK_RETRIES)
def _reconcile(plan: SlidePlan, homes: list[tuple[int, int]]):
    """Reconcile a run of homes; returns their QC counts, then each home's kept cells (one return each,
    so each is released on its own once no write needs it). Each tile's candidates are decoded once."""
    grid, found = plan.grid, {}
    for rc in sorted({rc for home in homes for rc in grid.neighbourhood(*home)}):
        key = grid.tile_at(*rc).key
        found[rc] = CellSet.from_bytes(plan.work.get(CANDIDATES, key)) if key in plan.planned_keys else CellSet()
    counts, kept = [], []
    for home in homes:
        result = reconcile_tile(home, [found[rc] for rc in grid.neighbourhood(*home)])
        counts.append(dict(cells=len(result.kept), reconciled=result.reconciled, oversized=result.oversized,
                           cut_at_window=result.cut_at_window))
        kept.append(result.kept)
    return (counts, *kept)


@ray.remote(max_retries=TASK_RETRIES)
def _write_cores(plan: SlidePlan, homes: list[tuple[int, int]], near: list[tuple[int, int]], offsets: list[int],
                 *kept: CellSet | None):
    """Paint a run of cores and write each unless it stays empty (its chunks keep the fill value).

    ``near`` are the homes around the run, ``offsets`` and ``kept`` theirs (``kept`` None for a home with
    no cell); each is numbered once for every core it reaches. Returns whether each core was written
    (small, fetched, so a failed write raises on the driver) and, with the cell table on, the sums of the
    cells painted in each core: (complete, seam pieces) per core.
    """
    numbered = {rc: with_ids(cells, offset) for rc, offset, cells in zip(near, offsets, kept) if cells is not None}
    written, sums = [], []
    for home in homes:
        tile = plan.grid.tile_at(*home)
        cells = [numbered[rc] for rc in plan.grid.neighbourhood(*home) if rc in numbered]
        labels = rasterise_core(tile, cells)
        written.append(bool(labels.any()))
        if written[-1]:
            labels_out.write_core(plan, tile, labels)
        if plan.spec.cell_table:
            sums.extend(per_tile.measure_tile(plan, tile, labels, CellSet.concat(cells)))
    return (written, *sums) if sums else written


@ray.remote(max_retries=TASK_RETRIES)
def _cell_rows(layout: TableLayout, homes: list[tuple[int, int]], pieces_per_home: list[int], *sums: CellSums):
    return per_tile.rows_of_homes(layout, homes, pieces_per_home, list(sums))


@ray.remote(max_retries=TASK_RETRIES)
def _qc_images(plan: SlidePlan, counts: dict) -> dict:
    from cellsam_ray.qc.views import write_qc_images  # one task per run: its imports stay out of the others

    return write_qc_images(plan, counts)


@ray.remote(max_retries=TASK_RETRIES)
def _pyramid_chunks(plan: SlidePlan, level: int, chunks: list[tuple[int, ...]]) -> None:
    for chunk_index in chunks:
        labels_out.build_label_chunk(plan, level, chunk_index)


@dataclass
class _Sent:
    """A batch given to the actor in ``slot``, and when."""

    slot: int
    actor: Any
    batch: list
    at: float


class _ModelStage:
    """The segment stage: every tile of ``todo`` through the model actors, two batches in flight per started actor.

    The pool is what ``capacity`` says the cluster has or can become; an actor is given batches once it
    has started (``started`` answered), so on a cluster that scales from zero the run begins with the
    first node that joins. Once the queue is empty, an actor with room also runs a batch that another
    actor has held for the spec's ``backup_after_s`` (and 3× the median batch time): an actor whose node was lost
    waits for room to restart, forever on a cluster without any, and a straggler holds the whole run back.
    Whichever copy finishes first counts; the other's results are the same bytes under the same keys.
    """

    def __init__(self, plan: SlidePlan, todo: list, stats: RunStats, progress: Progress) -> None:
        self.plan, self.stats, self.progress = plan, stats, progress
        stats.pool = capacity.plan_pool(plan.spec, len(todo))
        print(f"model actors: {stats.pool.describe()}", file=sys.stderr, flush=True)
        self.actor_cls = ray.remote(concurrency_groups={"control": 1})(SegmentWorker).options(
            max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES, max_concurrency=2,
            scheduling_strategy="SPREAD", **stats.pool.resources,
        )
        self.actors: list = [None] * min(stats.pool.count, len(todo))
        self.starting: dict[ray.ObjectRef, int] = {}  # an actor's started() call -> its slot
        self.ready: set[int] = set()  # slots whose actor has started
        self.node_of: dict[int, str] = {}  # slot -> the node its actor answered from
        self.losses: Counter[str] = Counter()  # tile key -> actors lost while it was alone in their batch
        for slot in range(len(self.actors)):
            self._start(slot)
        size = plan.spec.batch_size
        self.batches = deque(todo[i : i + size] for i in range(0, len(todo), size))
        self.outstanding = {t.key for t in todo}
        self.in_flight: dict[ray.ObjectRef, _Sent] = {}
        self.backed_up: set[ray.ObjectRef] = set()
        self.batch_seconds: list[float] = []

    def _start(self, slot: int) -> None:
        """A fresh actor in ``slot``, given tiles once it answers. The plan itself, not its reference: an
        actor restarted after its node was lost needs its arguments."""
        self.actors[slot] = self.actor_cls.remote(self.plan)
        self._ask(slot)

    def _ask(self, slot: int) -> None:
        """No tiles for ``slot`` until its actor answers ``started`` (again)."""
        self.ready.discard(slot)
        self.starting[self.actors[slot].started.remote()] = slot

    def _doubt_node(self, slot: int) -> None:
        """An actor of ``slot``'s node was lost: its other actors get no tiles until they answer, so tiles are
        not sent on to actors a lost node took with it (a node may run several: one per GPU)."""
        node = self.node_of.get(slot)
        for other in [s for s in self.ready if s != slot and self.node_of.get(s) == node]:
            self._ask(other)

    def waiting(self) -> list[ray.ObjectRef]:
        return [*self.in_flight, *self.starting]

    def take(self, ref: ray.ObjectRef) -> list[str]:
        """Take a finished batch or a started actor; returns the keys of the tiles segmented first."""
        if ref not in self.starting:
            return self.finished(ref)
        slot = self.starting.pop(ref)
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError as err:
            if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed:
                raise RunFailed(f"the model actors cannot start: {_failure_line(err)}") from None
            ray.kill(self.actors[slot])  # lost while starting, its restarts used up: a fresh one
            self._start(slot)
            return []
        if answer["unusable"]:
            raise RunFailed(f"the model actors cannot start: {answer['unusable']}")
        self.ready.add(slot)
        self.node_of[slot] = answer["node"]
        return []

    def _late_batch(self, slot: int) -> list | None:
        """The batch held longest by another actor, if it is late and has no backup yet."""
        times = self.batch_seconds
        least = self.plan.spec.backup_after_s
        limit = max(least, 3 * statistics.median(times)) if times else least
        now = time.monotonic()
        late = [(sent.at, ref) for ref, sent in self.in_flight.items()
                if sent.slot != slot and ref not in self.backed_up and now - sent.at > limit
                and any(t.key in self.outstanding for t in sent.batch)]
        if not late:
            return None
        ref = min(late, key=lambda pair: pair[0])[1]
        self.backed_up.add(ref)
        return self.in_flight[ref].batch

    def fill(self) -> None:
        for slot in sorted(self.ready):
            while sum(sent.slot == slot for sent in self.in_flight.values()) < 2:  # one read while one computes
                batch = self.batches.popleft() if self.batches else self._late_batch(slot)
                if batch is None:
                    break
                actor = self.actors[slot]
                self.in_flight[actor.run.remote(batch)] = _Sent(slot, actor, batch, time.monotonic())
                self.stats.batches += 1

    def finished(self, ref: ray.ObjectRef) -> list[str]:
        """Take a finished batch; returns the keys of the tiles it segmented first."""
        sent = self.in_flight.pop(ref)
        try:
            results = ray.get(ref)
            self.batch_seconds.append(time.monotonic() - sent.at)
        except ray.exceptions.RayError as err:  # retries are used up
            results = []
            lost = isinstance(err, ray.exceptions.RayActorError)
            if lost:
                if err.actor_init_failed:
                    raise RunFailed(f"the model actors cannot start: {_failure_line(err)}") from None
                if self.actors[sent.slot] is sent.actor:  # its restarts are used up: a fresh actor takes the slot
                    self._doubt_node(sent.slot)
                    ray.kill(sent.actor)
                    self._start(sent.slot)
            pending = [t for t in sent.batch if t.key in self.outstanding]
            if len(pending) > 1:  # retry tile by tile, to find the tile at fault
                self.batches.extendleft([t] for t in reversed(pending))
            elif pending and not any(pending[0] in other.batch for other in self.in_flight.values()):
                tile = pending[0]
                self.losses[tile.key] += lost
                if lost and self.losses[tile.key] < TILE_LOSSES:
                    self.batches.appendleft([tile])
                else:
                    self.stats.failed.append(TileFailure.of(tile, _failure_line(err)))
                    self.outstanding.discard(tile.key)
        segmented = []
        for key, n, seconds in results:
            if key not in self.outstanding:  # its backup's twin (or the original) came first
                continue
            self.outstanding.discard(key)
            segmented.append(key)
            self.stats.candidates += n
            self.stats.model_seconds += seconds
            self.stats.tiles_segmented += 1
            self.progress.tiles_done += 1
            self.progress.cells += n
        return segmented

    def close(self) -> None:
        _actor_facts([self.actors[slot] for slot in sorted(self.ready)], self.stats)
        self.kill()

    def kill(self) -> None:
        """End every actor now, their batches in flight with them, and those still waiting for room (so
        nothing the run asked for stays requested, and an autoscaler can scale down)."""
        for actor in self.actors:
            ray.kill(actor)


def _actor_facts(actors: list, stats: RunStats, timeout: float = 10) -> None:
    """Node, GPUs, device and peak memory of every actor that answers in time: best effort, never the
    run's failure.

    An actor whose node was lost may be dead, restarting or unreachable by now. ``ray.wait`` counts a ref
    whose task *failed* as ready, so each answer is fetched on its own, and an actor whose answer failed
    or did not come is left out of the report's lists.
    """
    asked = [actor.facts.remote() for actor in actors]
    ready = set(ray.wait(asked, num_returns=len(asked), timeout=timeout)[0])
    for ref in asked:
        if ref not in ready:
            continue
        try:
            stats.actors.append(ray.get(ref))
        except ray.exceptions.RayError:
            continue


def _tasks_in_flight() -> int:
    """How many CPU tasks the driver keeps submitted at once: enough to fill the cluster's CPUs twice."""
    return max(8, 2 * int(ray.cluster_resources().get("CPU", 1)))


HOMES_PER_TASK = 8
"""Neighbouring homes (cores) a reconcile (write) task takes at most. A run along a row decodes fewer candidate
files per home (a run of 4 decodes 18 instead of 36), and each task is a submission and a result the one
driver thread handles: 8 rather than 4 took the driver's CPU from 5.3 to 4.1 ms per tile, 16 to 3.9
(``bench.driver``, notes/pipeline.md), while a task still takes only the homes that are ready."""
CHUNKS_PER_TASK = 16  # pyramid chunks of one chunk row a task builds at most


class _HostStages:
    """The stages after segment (reconcile, paint, pyramid, table) as CPU tasks, each submitted as soon as
    ``Streams`` says what it reads is final: writes first, then pyramid chunks, then reconciles (what frees
    memory first), neighbouring units of a stage together (``_runs``), at most ``limit`` tasks and ``limit × HOMES_PER_TASK`` units in flight, so the
    driver and the object store hold what is in flight and the rows near the front, not a task per
    tile. A task that fails on every attempt raises on the driver and fails the run."""

    def __init__(self, plan_ref, plan: SlidePlan, streams: Streams, stats: RunStats, limit: int) -> None:
        self.plan_ref, self.plan, self.streams, self.stats, self.limit = plan_ref, plan, streams, stats, limit
        self.in_flight: dict[ray.ObjectRef, tuple] = {}  # ref -> (stage, units)
        self.units_in_flight = 0
        self.kept_refs: dict = {}  # home -> its kept cells, until the last core they paint is written
        self.sums: dict = {}  # tile row -> painted core -> (complete sums, seam pieces), until no row needs them
        self.counts: dict = {}  # home -> (cells, reconciled), for the QC pictures
        self.spans: dict[str, list[float]] = {}  # stage -> [first submitted, last finished]
        self.table = None  # (layout, writer actor, the appends not yet seen done), once writes open

    def _sent(self, stage: str, ref, units: list) -> None:
        self.in_flight[ref] = (stage, units)
        self.units_in_flight += len(units)
        self._counted(stage, units)

    def _counted(self, stage: str, units: list) -> None:
        """One task of ``stage`` taking ``units`` was submitted (the report's spans, tasks and units)."""
        self.spans.setdefault(stage, [time.perf_counter(), 0.0])
        self.stats.tasks[stage] = self.stats.tasks.get(stage, 0) + 1
        self.stats.units[stage] = self.stats.units.get(stage, 0) + len(units)

    def _room(self) -> int:
        """Units that may be handed out now."""
        if len(self.in_flight) >= self.limit:
            return 0
        return max(self.limit * HOMES_PER_TASK - self.units_in_flight, 0)

    def submit(self) -> None:
        streams, grid, table = self.streams, self.plan.grid, self.plan.spec.cell_table
        for homes in _runs(streams.take_writes(self._room()), HOMES_PER_TASK):
            near = sorted({rc for home in homes for rc in grid.neighbourhood(*home)})
            n = 1 + 2 * len(homes) if table else 1
            refs = _returns(_write_cores.options(num_returns=n).remote(
                self.plan_ref, homes, near, [streams.offsets.get(rc, 0) for rc in near],
                *[self.kept_refs.get(rc) for rc in near]), n)
            self._sent("write", refs[0], homes)
            for i, home in enumerate(homes if table else ()):
                self.sums.setdefault(home[0], {})[home] = refs[1 + 2 * i : 3 + 2 * i]
        for run in _chunk_runs(streams.take_chunks(self._room()), streams.row_of_chunk):
            self._sent("pyramid", _pyramid_chunks.remote(self.plan_ref, run[0][0], [c for _, c in run]), run)
        for homes in _runs(streams.take_reconciles(self._room()), HOMES_PER_TASK):
            refs = _reconcile.options(num_returns=1 + len(homes)).remote(self.plan_ref, homes)
            for home, ref in zip(homes, refs[1:]):
                self.kept_refs[home] = ref
            self._sent("reconcile", refs[0], homes)
        for home in streams.released:
            self.kept_refs.pop(home, None)
        streams.released.clear()
        if table and streams.writes_open:
            self._table_rows()

    def _start_table(self) -> tuple:
        """The table's one writer; it creates the file beside the labels, so only once writes may start."""
        plan = self.plan
        layout = per_tile.table_layout(plan)
        h5ad = labels_out.sidecar_url(plan, "cells.h5ad") if plan.spec.cell_table_h5ad else None
        # No CPU reserved: its work is small, and for the run's whole length a fractional reservation would
        # keep a whole CPU task from every node it sits on.
        writer = ray.remote(ParquetStream).options(num_cpus=0).remote(
            labels_out.sidecar_url(plan, "cells.parquet"), plan.spec.storage, layout, h5ad)
        return layout, writer, []

    def _table_rows(self) -> None:
        """Rows of the cores the table may take, appended in raster (= id) order to the one writer."""
        self.table = self.table or self._start_table()
        layout, writer, appends = self.table
        grid = self.plan.grid
        homes, pieces_per_home, sums = self.streams.take_table_rows(), [], []
        for home in homes:
            near = [self.sums.get(rc[0], {}).get(rc) for rc in grid.neighbourhood(*home)]
            pieces = [refs[1] for refs in near if refs is not None]
            sums += [self.sums[home[0]][home][0], *pieces]
            pieces_per_home.append(len(pieces))
        if homes:
            appends.append(writer.append.remote(_cell_rows.remote(layout, homes, pieces_per_home, *sums)))
            self._counted("cell_table", homes)
        position = self.streams.table_position  # rows to come need the sums of its row and the one above
        for row in [r for r in self.sums if position is None or r < position[0] - 1]:
            del self.sums[row]
        if len(appends) > 2 * self.limit:  # now and then: raise an append that failed, forget the done
            done, appends[:] = ray.wait(appends, num_returns=len(appends), timeout=0)
            ray.get(done)

    def finished(self, ref) -> None:
        stage, units = self.in_flight.pop(ref)
        self.units_in_flight -= len(units)
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
            self._table_rows()  # a slide without cells still gets its (empty) table
            _, writer, appends = self.table
            ray.get(appends)
            self.stats.cell_table = ray.get(writer.close.remote())
            ray.kill(writer)
            self.spans.setdefault("cell_table", [time.perf_counter(), 0.0])[1] = time.perf_counter()
        if qc:
            self.stats.qc = ray.get(qc)
        for stage, (first, last) in self.spans.items():
            self.stats.stage_seconds[stage] = max(last - first, 0.0)


def run_plan(plan: SlidePlan, on_progress: Callable[[Progress], None] | None = None, *,
             on_segmented: Callable[[], None] | None = None, writes_wait: bool = False,
             stats: RunStats | None = None) -> RunStats:
    """Run every stage, streaming: a region is reconciled, painted and pyramided as soon as the tiles it
    reads are segmented, while the model actors go on. ``on_segmented`` is called once every tile is
    segmented (and persisted); with ``writes_wait`` nothing is written into the label image before it
    returns (an overwrite swaps the old result out there). ``stats`` (filled as the run goes, so a caller
    sees how far a failed run came) is returned. The stages overlap, so the report's per-stage seconds
    are each stage's span, from its first task submitted to its last finished."""
    stats = RunStats() if stats is None else stats
    plan_ref = ray.put(plan)  # once, into the object store; every task gets the reference
    finished = plan.work.done(CANDIDATES)
    todo = [t for t in plan.tiles if t.key not in finished]
    progress = Progress(tiles_total=len(plan.tiles), tiles_done=len(plan.tiles) - len(todo))
    progress.tiles_resumed = progress.tiles_done
    stats.tiles_resumed = progress.tiles_resumed
    streams = Streams(plan, set(finished))
    if not writes_wait:
        streams.open_writes()
    host = _HostStages(plan_ref, plan, streams, stats, _tasks_in_flight())
    started = time.perf_counter()

    def segmented() -> None:
        stats.stage_seconds["segment"] = time.perf_counter() - started
        stats.tasks["segment_batches"] = stats.batches
        if on_segmented is not None:
            on_segmented()
        if not streams.writes_open:
            streams.open_writes()

    model = _ModelStage(plan, todo, stats, progress) if todo else None
    try:
        if model is None:
            segmented()
        while True:
            if model is not None and not model.outstanding:
                model.close()
                model = None
                if stats.failed:  # the finished tiles are persisted; a rerun of the same spec retries the rest
                    host.drain()
                    return stats
                segmented()
            if model is not None:
                model.fill()
            host.submit()
            waiting = (model.waiting() if model is not None else []) + list(host.in_flight)
            if not waiting:
                break
            ready, _ = ray.wait(waiting, num_returns=1, timeout=5)
            for ref in ready:
                if model is not None and (ref in model.in_flight or ref in model.starting):
                    for key in model.take(ref):
                        streams.tile_segmented(key)
                    if on_progress:
                        on_progress(progress)
                else:
                    host.finished(ref)
    except BaseException:
        if model is not None:
            model.kill()  # stopped or failed: no more tiles, and the CPUs they held go to ending the tasks
        host.cancel()
        raise
    if not streams.complete:
        raise RuntimeError("the streamed stages ended before every region was written (a bug in driver.streaming)")
    host.close()
    return stats
