"""Running a slide plan on Ray: every actor, task, retry and resource request lives here.

- Stage A runs in a pool of model actors (one model each; ``num_gpus`` when the cluster has GPUs). Tile
  descriptors travel, not pixels: an actor reads its own windows in a thread while its previous batch is
  on the model (``max_concurrency=2``), and the driver keeps two batches in flight per actor. An actor
  writes a batch's candidates to the work store itself, after releasing the model to the other batch in
  flight, so a batch the driver sees finished is persisted (no task per tile to schedule).
- Stages B, D and E are CPU tasks; stage C is a prefix sum on the driver over one integer per tile.
- The cell table is measured in stage D; per-tile tasks combine seam pieces while stage E runs, and one
  small writer actor streams their rows, in id order, to one Parquet file. The QC pictures are one task
  after stage E (they need the label pyramid).
- Actors restart and tasks retry (set explicitly: Ray's defaults for actors are 0); every write is to a
  key derived from the tile or chunk alone, so a retry rewrites the same bytes. A batch held too long (an
  actor waiting for room to restart after its node was lost, or a straggler) is also given to an idle
  actor once the queue is empty; the first copy to finish counts.
- A batch that still fails is retried tile by tile; a tile that fails on every attempt is recorded
  (``RunStats.failed``) and the later stages do not run, so no tile is ever left silently empty. Device out
  of memory halves an actor's batch, down to one tile, and shrinks CellSAM's decoder chunk; a sticky CUDA
  error ends the actor's process, so Ray restarts it with a fresh context.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from cellsam_ray import device
from cellsam_ray.errors import RunFailed, UserError
from cellsam_ray.merge.objects import CellSet
from cellsam_ray.merge.rasterise import rasterise_core
from cellsam_ray.merge.reconcile import global_offsets
from cellsam_ray.pipeline import extent, labels_out, source
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.pipeline.stages import Inferred, finish_tiles, infer_tiles, reconcile_tile, with_ids
from cellsam_ray.qc.views import write_qc_images
from cellsam_ray.report import TileFailure
from cellsam_ray.table import stage as table_stage
from cellsam_ray.table.measure import CellSums
from cellsam_ray.table.schema import TableLayout
from cellsam_ray.table.write import ParquetStream

CANDIDATES = "candidates"
ACTOR_RESTARTS = 3
BACKUP_AFTER_S = float(os.environ.get("CELLSAM_RAY_BACKUP_AFTER_S", "120"))
"""Seconds (at least) a batch is in flight before an idle actor runs it too (see ``_segment_stage``)."""
TASK_RETRIES = 3
PERSIST_CPUS = 0.1  # small I/O work (the cell table's writer) must not wait for a CPU the model actors hold


@dataclass
class Progress:
    """What a progress display needs; updated by the driver as results arrive."""

    tiles_total: int
    tiles_done: int = 0
    tiles_resumed: int = 0
    cells: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def rate(self) -> float:
        return (self.tiles_done - self.tiles_resumed) / max(time.perf_counter() - self.started, 1e-9)


@dataclass
class RunStats:
    tiles_segmented: int = 0
    tiles_resumed: int = 0
    candidates: int = 0
    cells: int = 0
    reconciled: int = 0
    oversized: int = 0
    cut_at_window: int = 0
    model_seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    cell_table: dict | None = None  # where the table went, its rows and columns
    qc: dict | None = None  # the QC pictures written
    actor_peak_rss_mb: list = field(default_factory=list)
    nodes: list = field(default_factory=list)  # Ray node ids the model actors ran on
    tasks: dict = field(default_factory=dict)  # tasks (or actor calls) per stage
    batches: int = 0  # model batches handed to the actors
    failed: list[TileFailure] = field(default_factory=list)


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
        self.segmenter = source.build_segmenter(plan)
        _use_assigned_cpus()
        self.readers = ThreadPoolExecutor(max_workers=4)
        self.model_lock = threading.Lock()
        self.batch_limit = plan.spec.batch_size  # lowered for good after a CUDA out-of-memory error

    @ray.method(retry_exceptions=True)  # a transient error (a storage hiccup) costs a retry, not the tile
    def run(self, tiles: list) -> list[tuple[str, int, float]]:
        windows = list(self.readers.map(lambda t: source.read_window(self.plan, t), tiles))
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
        """The model's part of stage A in sub-batches of at most ``batch_limit`` tiles; out of device memory
        halves the limit and shrinks the segmenter's own work (``device.run_shrinking``), and the lower
        sizes stay for this actor's later batches."""
        def run(part: list) -> Inferred:
            return infer_tiles(self.segmenter, [t for t, _ in part], [w for _, w in part])

        done, self.batch_limit = device.run_shrinking(list(zip(tiles, windows)), self.batch_limit, run,
                                                      getattr(self.segmenter, "on_out_of_memory", None))
        return [([t for t, _ in part], inferred) for part, inferred in done]

    @ray.method(concurrency_group="control")  # answers while both batch threads are busy
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="control")
    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one_line(err: BaseException) -> str:
    """What went wrong, in one line: the segmenter's own exception rather than Ray's wrapper."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed:
        return last  # the constructor's own exception, e.g. "KeyError: 'X'"
    return f"{type(err).__name__}: {last}"


@ray.remote(max_retries=TASK_RETRIES, num_returns=2)
def _reconcile(plan: SlidePlan, home: tuple[int, int]):
    grid = plan.grid
    neighbourhood = []
    for rc in grid.neighbourhood(*home):
        key = grid.tile_at(*rc).key
        planned = key in plan.planned_keys
        neighbourhood.append(CellSet.from_bytes(plan.work.get(CANDIDATES, key)) if planned else CellSet())
    result = reconcile_tile(home, neighbourhood)
    counts = dict(cells=len(result.kept), reconciled=result.reconciled, oversized=result.oversized,
                  cut_at_window=result.cut_at_window)
    return counts, result.kept


@ray.remote(max_retries=TASK_RETRIES, num_returns=3)
def _write_core(plan: SlidePlan, home: tuple[int, int], offsets: list[int], *kept: CellSet | None):
    """Paint one core and write it, unless it stays empty (its chunks keep the fill value); returns whether
    it was written (small, fetched, so a failed write raises on the driver) and, with the cell table on,
    the sums of the cells painted there: (complete, seam pieces). ``kept`` is None for a neighbour that
    homes no cell."""
    tile = plan.grid.tile_at(*home)
    numbered = [with_ids(cells, offset) for cells, offset in zip(kept, offsets) if cells is not None]
    labels = rasterise_core(tile, numbered)
    written = bool(labels.any())
    if written:
        labels_out.write_core(plan, tile, labels)
    if not plan.spec.cell_table:
        return written, None, None
    return (written, *table_stage.measure_tile(plan, tile, labels, CellSet.concat(numbered)))


@ray.remote(max_retries=TASK_RETRIES)
def _cell_rows(layout: TableLayout, home: tuple[int, int], complete: CellSums, *pieces: CellSums):
    return table_stage.home_rows(layout, home, complete, list(pieces))


@ray.remote(max_retries=TASK_RETRIES)
def _qc_images(plan: SlidePlan, counts: dict) -> dict:
    return write_qc_images(plan, counts)


@ray.remote(max_retries=TASK_RETRIES)
def _pyramid_chunk(plan: SlidePlan, level: int, chunk_index: tuple[int, ...]) -> None:
    labels_out.build_chunk(plan, level, chunk_index)


# Names of variables never forwarded to the actors: a runtime_env is kept by Ray and shown by its dashboard.
_SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")


def _segmenter_environment() -> dict | None:
    """The driver's ``CELLSAM_RAY_*`` variables, for segmenters configured by environment (they are
    built with no arguments); the actors may run in processes started before the driver set them. A
    variable whose name says it holds a secret stays on the driver: each node has its own."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith("CELLSAM_RAY_") and not any(word in k for word in _SECRET_WORDS)}
    return {"env_vars": env} if env else None


def _actor_resources(plan: SlidePlan) -> tuple[int, dict]:
    """How many model actors, and what each asks for: a GPU share and CPUs where GPUs exist, else CPUs.

    A GPU actor does host work besides the model (reading windows, CellSAM's cleanup, the candidates), so
    it asks for ``cpus_per_worker`` CPUs, by default its share of the GPU nodes' CPUs (the fewest CPUs per
    GPU among them, times ``gpus_per_worker``) less what stays free for small I/O work. Without GPUs the
    actors share the cluster's CPUs less that reserve (fractional CPUs are fine for Ray's scheduler), and
    no actor asks for more than the largest node has less the reserve: an actor is one process, and a
    request no node can meet waits forever.
    """
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return _model_actors(plan.spec, ray.cluster_resources(), nodes)


def _model_actors(spec, cluster: dict, nodes: list[dict]) -> tuple[int, dict]:
    """``_actor_resources`` for a cluster's total resources and its live nodes' resources."""
    reserve = PERSIST_CPUS * 2.5
    gpus = cluster.get("GPU", 0)
    if gpus and spec.device != "cpu":
        most = max((node.get("GPU", 0) for node in nodes), default=gpus)
        if spec.gpus_per_worker > most:
            raise UserError(f"--gpus-per-worker {spec.gpus_per_worker:g} is more than any node of the cluster has "
                            f"({most:g} GPUs): an actor is one process on one node, and would wait forever")
        workers = spec.workers or max(int(gpus // spec.gpus_per_worker), 1)
        per_gpu = min((node.get("CPU", 1) / node["GPU"] for node in nodes if node.get("GPU")), default=1)
        cpus = spec.cpus_per_worker or max(round(per_gpu * spec.gpus_per_worker - reserve, 2), 1)
        return workers, {"num_gpus": spec.gpus_per_worker, "num_cpus": cpus}
    cpus = cluster.get("CPU", 1)
    largest_node = max((node.get("CPU", 0) for node in nodes), default=cpus)
    workers = spec.workers or 1
    return workers, {"num_cpus": round(min((cpus - reserve) / workers, largest_node - reserve), 2)}


def _start_cell_table(plan_ref, plan: SlidePlan, homes: list[tuple[int, int]], written: dict) -> tuple:
    """Submit the per-tile row tasks and their appends, in raster (= id) order, to one writer actor; the
    returned refs finish while the label pyramid is built. ``written`` holds each painted core's refs."""
    layout = table_stage.table_layout(plan)
    h5ad = labels_out.sidecar_url(plan, "cells.h5ad") if plan.spec.cell_table_h5ad else None
    writer = ray.remote(ParquetStream).options(num_cpus=PERSIST_CPUS).remote(
        labels_out.sidecar_url(plan, "cells.parquet"), plan.spec.storage, layout, h5ad)
    appends = []
    for home in homes:
        pieces = [written[rc][2] for rc in plan.grid.neighbourhood(*home) if rc in written]
        appends.append(writer.append.remote(_cell_rows.remote(layout, home, written[home][1], *pieces)))
    return writer, appends, writer.close.remote()


@dataclass
class _Sent:
    """A batch given to the actor in ``slot``, and when."""

    slot: int
    actor: Any
    batch: list
    at: float


def _segment_stage(plan: SlidePlan, todo: list, stats: RunStats, progress: Progress,
                   on_progress: Callable[[Progress], None] | None) -> None:
    """Stage A: every tile of ``todo`` through the model actors, two batches in flight per actor.

    Once the queue is empty, an actor with room also runs a batch that another actor has held for
    ``BACKUP_AFTER_S`` (and 3× the median batch time): an actor whose node was lost waits for room to
    restart, forever on a cluster without any, and a straggler holds the whole run back. Whichever copy
    finishes first counts; the other's results are the same bytes under the same keys.
    """
    n_workers, resources = _actor_resources(plan)
    actor_cls = ray.remote(concurrency_groups={"control": 1})(SegmentWorker).options(
        max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES, max_concurrency=2,
        scheduling_strategy="SPREAD", runtime_env=_segmenter_environment(), **resources,
    )
    # The plan itself, not its reference: an actor restarted after its node was lost needs its arguments.
    actors = [actor_cls.remote(plan) for _ in range(min(n_workers, len(todo)))]
    batches = deque(todo[i : i + plan.spec.batch_size] for i in range(0, len(todo), plan.spec.batch_size))
    outstanding = {t.key for t in todo}
    in_flight: dict[ray.ObjectRef, _Sent] = {}
    backed_up: set[ray.ObjectRef] = set()
    batch_seconds: list[float] = []

    def late_batch(slot: int) -> list | None:
        """The batch held longest by another actor, if it is late and has no backup yet."""
        limit = max(BACKUP_AFTER_S, 3 * statistics.median(batch_seconds)) if batch_seconds else BACKUP_AFTER_S
        now = time.monotonic()
        late = [(sent.at, ref) for ref, sent in in_flight.items()
                if sent.slot != slot and ref not in backed_up and now - sent.at > limit
                and any(t.key in outstanding for t in sent.batch)]
        if not late:
            return None
        ref = min(late, key=lambda pair: pair[0])[1]
        backed_up.add(ref)
        return in_flight[ref].batch

    def fill() -> None:
        for slot, actor in enumerate(actors):
            while sum(sent.slot == slot for sent in in_flight.values()) < 2:  # the next is read while one computes
                batch = batches.popleft() if batches else late_batch(slot)
                if batch is None:
                    break
                in_flight[actor.run.remote(batch)] = _Sent(slot, actor, batch, time.monotonic())
                stats.batches += 1

    fill()
    while outstanding:
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=5)
        if ready:
            sent = in_flight.pop(ready[0])
            try:
                results = ray.get(ready[0])
                batch_seconds.append(time.monotonic() - sent.at)
            except ray.exceptions.RayError as err:  # retries are used up
                results = []
                if isinstance(err, ray.exceptions.RayActorError):
                    if err.actor_init_failed:
                        raise RunFailed(f"the model actors cannot start: {_one_line(err)}") from None
                    if actors[sent.slot] is sent.actor:  # its restarts are used up: a fresh actor takes the slot
                        ray.kill(sent.actor)
                        actors[sent.slot] = actor_cls.remote(plan)
                pending = [t for t in sent.batch if t.key in outstanding]
                if len(pending) > 1:  # retry tile by tile, to find the tile at fault
                    batches.extendleft([t] for t in reversed(pending))
                elif pending and not any(pending[0] in other.batch for other in in_flight.values()):
                    stats.failed.append(TileFailure.of(pending[0], _one_line(err)))
                    outstanding.discard(pending[0].key)
            for key, n, seconds in results:
                if key not in outstanding:  # its backup's twin (or the original) came first
                    continue
                outstanding.discard(key)
                stats.candidates += n
                stats.model_seconds += seconds
                stats.tiles_segmented += 1
                progress.tiles_done += 1
                progress.cells += n
            if on_progress:
                on_progress(progress)
        fill()
    _actor_facts(actors, stats)
    for actor in actors:
        ray.kill(actor)


def _actor_facts(actors: list, stats: RunStats, timeout: float = 10) -> None:
    """Peak memory and node of every actor that answers in time: best effort, never the run's failure.

    An actor whose node was lost may be dead, restarting or unreachable by now. ``ray.wait`` counts a ref
    whose task *failed* as ready, so each answer is fetched on its own, and an actor whose answer failed
    or did not come is left out of the report's lists.
    """
    asked = [(actor.peak_rss_mb.remote(), actor.node_id.remote()) for actor in actors]
    refs = [ref for pair in asked for ref in pair]
    ready = set(ray.wait(refs, num_returns=len(refs), timeout=timeout)[0])
    nodes = set()
    for rss, node in asked:
        if rss not in ready or node not in ready:
            continue
        try:
            peak_rss_mb, node_id = ray.get([rss, node])
        except ray.exceptions.RayError:
            continue
        stats.actor_peak_rss_mb.append(round(peak_rss_mb, 1))
        nodes.add(node_id)
    stats.nodes = sorted(nodes)


def _tasks_in_flight() -> int:
    """How many CPU tasks the driver keeps submitted at once: enough to fill the cluster's CPUs twice."""
    return max(8, 2 * int(ray.cluster_resources().get("CPU", 1)))


def _bounded(items: list, submit: Callable[[Any], Any], limit: int):
    """Yield ``(item, submit(item))`` for each item, submitting the next only while fewer than ``limit``
    submitted tasks are unfinished, so the driver and the object store hold what is in flight, not a
    task per tile. ``submit`` returns one ref or a list of them (the first says the task is done)."""
    pending: list[ray.ObjectRef] = []
    for item in items:
        if len(pending) >= limit:
            _, pending = ray.wait(pending, num_returns=len(pending) - limit + 1)
        refs = submit(item)
        pending.append(refs[0] if isinstance(refs, (list, tuple)) else refs)
        yield item, refs


def _write_stage(plan_ref, plan: SlidePlan, painted: list, offsets: dict, kept_refs: dict, limit: int) -> dict:
    """Paint and write every core of ``painted``, a bounded number at a time; a home's kept cells are
    released as soon as the last core that needs them is written. Returns each core's refs (written?,
    complete sums, seam pieces), the first fetched."""
    grid = plan.grid
    users: dict = {}
    for home in painted:
        for rc in grid.neighbourhood(*home):
            users[rc] = users.get(rc, 0) + 1
    written, home_of = {}, {}

    def submit(home):
        block = grid.neighbourhood(*home)
        refs = _write_core.remote(plan_ref, home, [offsets.get(rc, 0) for rc in block],
                                  *[kept_refs.get(rc) for rc in block])
        home_of[refs[0]] = home
        return refs

    def release(done: list) -> None:
        for ref in done:
            for rc in grid.neighbourhood(*home_of.pop(ref)):
                users[rc] -= 1
                if not users[rc]:
                    kept_refs.pop(rc, None)

    unfinished: list = []
    for home, refs in _bounded(painted, submit, limit):
        written[home] = refs
        unfinished.append(refs[0])
        done, unfinished = ray.wait(unfinished, num_returns=len(unfinished), timeout=0)
        release(done)
    flags = ray.get([written[h][0] for h in painted])  # raises a write that failed on every attempt
    release(unfinished)
    return {h: (flag, *written[h][1:]) for h, flag in zip(painted, flags)}


def _pyramid_stage(plan_ref, plan: SlidePlan, cores: list, limit: int) -> int:
    """Build, level by level, the chunks made from what was written (``cores`` at the segmented level):
    chunks no written region reaches keep the fill value and cost no task. Returns the tasks run."""
    boxes = {plan.level: cores}
    tasks = 0
    for level in labels_out.build_order(plan):
        chunks = extent.chunks_touched(plan, level, boxes[labels_out.source_level(plan, level)])
        refs = [ref for _, ref in _bounded(chunks, lambda i: _pyramid_chunk.remote(plan_ref, level, i), limit)]
        ray.get(refs)
        boxes[level] = extent.chunk_boxes(plan, level, chunks)
        tasks += len(chunks)
    return tasks


def run_plan(plan: SlidePlan, on_progress: Callable[[Progress], None] | None = None, *,
             before_write: Callable[[], None] | None = None, stats: RunStats | None = None) -> RunStats:
    """Run every stage; ``before_write`` is called once every tile is segmented (and persisted) and
    reconciled, before anything is written into the label image; ``stats`` (filled as the run goes, so a
    caller sees how far a failed run came) is returned."""
    stats = RunStats() if stats is None else stats
    plan_ref = ray.put(plan)  # once, into the object store; every task gets the reference
    finished = plan.work.done(CANDIDATES)
    todo = [t for t in plan.tiles if t.key not in finished]
    progress = Progress(tiles_total=len(plan.tiles), tiles_done=len(plan.tiles) - len(todo))
    progress.tiles_resumed = progress.tiles_done
    stats.tiles_resumed = progress.tiles_resumed

    t0 = time.perf_counter()
    if todo:
        _segment_stage(plan, todo, stats, progress, on_progress)
    stats.stage_seconds["segment"] = time.perf_counter() - t0
    stats.tasks["segment_batches"] = stats.batches
    if stats.failed:  # the finished tiles are persisted; a rerun of the same spec retries the rest
        return stats

    limit = _tasks_in_flight()
    t0 = time.perf_counter()
    homes = extent.active_homes(plan)
    kept_refs, count_refs = {}, {}
    for home, (counts_ref, kept_ref) in _bounded(homes, lambda h: _reconcile.remote(plan_ref, h), limit):
        count_refs[home], kept_refs[home] = counts_ref, kept_ref
    counts = dict(zip(homes, ray.get([count_refs[h] for h in homes])))
    del count_refs
    for c in counts.values():
        stats.cells += c["cells"]
        stats.reconciled += c["reconciled"]
        stats.oversized += c["oversized"]
        stats.cut_at_window += c["cut_at_window"]
    offsets = dict(zip(homes, global_offsets([counts[h]["cells"] for h in homes])))
    stats.tasks["reconcile"] = len(homes)
    stats.stage_seconds["reconcile"] = time.perf_counter() - t0
    if before_write is not None:
        before_write()

    t0 = time.perf_counter()
    painted = extent.painted_homes(plan, {h: c["cells"] for h, c in counts.items()})
    written = _write_stage(plan_ref, plan, painted, offsets, kept_refs, limit)
    stats.tasks["write"] = len(painted)
    stats.stage_seconds["write"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    table = _start_cell_table(plan_ref, plan, painted, written) if plan.spec.cell_table else None
    cores = [extent.core_box(plan, plan.grid.tile_at(*h)) for h, refs in written.items() if refs[0]]
    del written  # the row tasks hold the sums they need; each is freed once its tasks are done
    stats.tasks["pyramid"] = _pyramid_stage(plan_ref, plan, cores, limit)
    stats.stage_seconds["pyramid"] = time.perf_counter() - t0
    qc = None
    if plan.spec.qc_images:
        qc = _qc_images.remote(plan_ref, {home: (c["cells"], c["reconciled"]) for home, c in counts.items()})

    if table:
        writer, appends, closed = table
        ray.get(appends)
        stats.cell_table = ray.get(closed)
        ray.kill(writer)
        stats.stage_seconds["cell_table"] = time.perf_counter() - t0  # overlaps the pyramid
    if qc:
        stats.qc = ray.get(qc)
    return stats
