"""The segment stage: one pool of model actors, started once, segmenting the tiles of every slide of a run.

- One model per actor (``num_gpus`` when the cluster has GPUs or its autoscaler can add them:
  ``capacity``). An actor gets tiles once it has started, so a run begins with the first actor ready and
  grows as nodes join; actors that never find room hold no tiles.
- Tile descriptors travel, not pixels: an actor reads its own windows in a thread while its previous batch
  is on the model (``max_concurrency=2``), and the pool keeps two calls in flight per actor. An actor
  writes each batch's candidates to the slide's work store itself, after releasing the model to the other
  call in flight, so a batch is persisted as soon as it is done (no task per tile to schedule), and a
  rerun resumes after it even if its call was lost.
- A call carries several batches of one slide when batches are quick (up to ``BATCHES_PER_CALL``, about
  ``CALL_SECONDS`` of work) and the queue is long (``QUEUE_PER_ACTOR`` batches per actor), one otherwise:
  each call costs the driver's one thread about as much as a batch, so a fast model (a GPU) needs fewer
  calls for the driver to keep up; a slow one (CPUs) keeps a call per batch, so progress moves with every
  batch; and one batch per call at the end spreads the last tiles over every actor.
- A call names its slide (its run id and plan reference): an actor fetches a slide's plan once and keeps
  the last few, so the weights are loaded once per actor for a whole cohort and the next slide's tiles
  follow the last one's without a pause. Every slide of a run shares the spec's model fields, so the
  model built from the first slide's plan serves them all.
- Actors restart and calls retry (set explicitly: Ray's defaults for actors are 0). A call held too long
  (an actor waiting for room to restart after its node was lost, or a straggler) is also given to an idle
  actor once the queue is empty; the first copy to finish counts.
- A call that still fails is retried tile by tile; a tile that fails on every attempt is recorded in its
  slide's ``RunStats.failed``. Device out of memory halves an actor's batch, down to one tile, and shrinks
  CellSAM's decoder chunk; a sticky CUDA error ends the actor's process, so Ray restarts it with a fresh
  context.
"""

from __future__ import annotations

import resource
import statistics
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray

from cellsam_ray import device
from cellsam_ray.driver import capacity
from cellsam_ray.errors import RunFailed, UserError, one_line
from cellsam_ray.pipeline import source
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.pipeline.stages import Inferred, finish_tiles, run_model
from cellsam_ray.report import TileFailure

CANDIDATES = "candidates"
ACTOR_RESTARTS = 3
TASK_RETRIES = 3
TILE_LOSSES = 3
"""A tile alone in a batch whose actor was lost this many times fails (it kills its actor: out of host memory,
a crash in native code); before that, losing an actor is not the tile's fault (its node went away)."""
TIMES_KEPT = 1000  # the latest call times, whose median says when a call is late, and per batch
BATCHES_PER_CALL = 8
"""Batches an actor call carries at most: the driver's CPU per tile falls with it (a 16,384² slide of 256-px
tiles: notes/pipeline.md); more would hold more tiles back from the streamed stages per call."""
CALL_SECONDS = 4.0
"""Calls carry as many batches as take about this long from sent to done (the median batch so far; with two
calls in flight per actor, about half of it the call's own work), so that progress and the streamed stages
still move every few seconds."""
QUEUE_PER_ACTOR = 8
"""Below this many queued batches per started actor, calls carry fewer batches, down to one."""
PLANS_KEPT = 8
"""Slide plans an actor keeps decoded, newest used last: more than a run keeps slides in flight."""


def _use_assigned_cpus() -> None:
    """Give torch the CPUs Ray assigned to this actor: Ray sets OMP_NUM_THREADS to 1 for fractional
    shares (1.75 CPUs gives 1 thread), which would leave a core idle on a CPU-only node. Only a segmenter
    that imported torch pays for it (called after building the segmenter, before it runs)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, round(cpus)))


class SegmentWorker:
    """One model; segments batches of tiles of any slide of the run, reading the next batch's windows while
    one is on the model."""

    def __init__(self, plan: SlidePlan) -> None:
        self.plans: OrderedDict[str, SlidePlan] = OrderedDict({plan.run_id: plan})
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

    def _plan(self, run_id: str, plan_ref: list) -> SlidePlan:
        """The plan of the slide ``run_id``, fetched once (``plan_ref``: its reference, in a list so that
        Ray passes the reference and not the plan with every call)."""
        plan = self.plans.get(run_id)
        if plan is None:
            plan = self.plans[run_id] = ray.get(plan_ref[0])
        self.plans.move_to_end(run_id)
        while len(self.plans) > PLANS_KEPT:
            self.plans.popitem(last=False)
        return plan

    @ray.method(retry_exceptions=True)  # a transient error (a storage hiccup) costs a retry, not the tile
    def run(self, batches: tuple[list, ...], run_id: str, plan_ref: list) -> list[tuple[str, int, float]]:
        """Segment ``batches`` of the slide ``run_id`` one after the other, each persisted once done."""
        if self.unusable:  # restarted on a node that cannot run the model
            raise RuntimeError(self.unusable)
        plan = self._plan(run_id, plan_ref)
        return [found for tiles in batches for found in self._batch(plan, tiles)]

    def _batch(self, plan: SlidePlan, tiles: list) -> list[tuple[str, int, float]]:
        windows = source.read_windows(plan, tiles)
        try:
            with self.model_lock:
                inferred = self._infer(tiles, windows)
            # Host work (the segmenter's cleanup, the candidates) outside the lock: the other call in
            # flight has the model meanwhile.
            results = [r for part, done in inferred for r in finish_tiles(plan, part, done)]
        except Exception as err:
            device.exit_if_device_broken(err)
            raise
        list(self.readers.map(lambda r: plan.work.put(CANDIDATES, r[1].key, r[0].to_bytes()), results))
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


def failure_line(err: BaseException) -> str:
    """What went wrong, in one line: the segmenter's own exception rather than Ray's wrapper."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    if cause is not None:
        return one_line(cause)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed:
        return last  # the constructor's own exception, e.g. "KeyError: 'X'"
    return f"{type(err).__name__}: {last}"


@dataclass
class _Sent:
    """A call with batches of one slide's tiles given to the actor in ``slot``, and when."""

    slot: int
    actor: Any
    slide: Any  # the slide's loop state (``execution.SlideWork``): plan, plan_ref, outstanding, stats, progress
    batches: tuple[list, ...]
    at: float

    @property
    def tiles(self) -> list:
        return [tile for batch in self.batches for tile in batch]


class ModelPool:
    """Every queued tile through the model actors, two calls in flight per started actor.

    The pool is what ``capacity`` says the cluster has or can become (``sizing``; sized once per run); an
    actor is given batches once it has started (``started`` answered), so on a cluster that scales from
    zero the run begins with the first node that joins. Slides are queued in the order they are added, so
    the first slide finishes segmenting first. Once the queue is empty, an actor with room also runs a
    call that another actor has held for the spec's ``backup_after_s`` (and 3× the median call time):
    an actor whose node was lost waits for room to restart, forever on a cluster without any, and a
    straggler holds the whole run back. Whichever copy finishes first counts; the other's results are the
    same bytes under the same keys.
    """

    def __init__(self, plan: SlidePlan, tiles: int, sizing: capacity.Pool | None = None) -> None:
        """Actors for ``tiles`` tiles (all the run expects), built from ``plan`` (any slide of the run)."""
        self.plan = plan
        self.sizing = sizing or capacity.plan_pool(plan.spec, tiles)
        print(f"model actors: {self.sizing.describe()}", file=sys.stderr, flush=True)
        self.actor_cls = ray.remote(concurrency_groups={"control": 1})(SegmentWorker).options(
            max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES, max_concurrency=2,
            scheduling_strategy="SPREAD", **self.sizing.resources,
        )
        self.actors: list = [None] * min(self.sizing.count, max(tiles, 1))
        self.starting: dict[ray.ObjectRef, int] = {}  # an actor's started() call -> its slot
        self.ready: set[int] = set()  # slots whose actor has started
        self.node_of: dict[int, str] = {}  # slot -> the node its actor answered from
        self.losses: Counter[tuple[str, str]] = Counter()  # (run id, tile key) -> actors lost with it alone
        for slot in range(len(self.actors)):
            self._start(slot)
        # (slide, tiles, alone): batches in the order slides were added; ``alone`` for a tile retried on its own
        self.batches: deque[tuple[Any, list, bool]] = deque()
        self.in_flight: dict[ray.ObjectRef, _Sent] = {}
        self.per_slot: Counter[int] = Counter()  # slot -> its calls in flight
        self.backed_up: set[ray.ObjectRef] = set()  # calls in flight that an idle actor also runs
        self.call_seconds: deque[float] = deque(maxlen=TIMES_KEPT)
        self.batch_seconds: deque[float] = deque(maxlen=TIMES_KEPT)  # a call's time over its batches

    @property
    def on_gpus(self) -> bool:
        return bool(self.sizing.resources.get("num_gpus"))

    def add(self, slide, tiles: list) -> None:
        """Queue ``tiles`` of ``slide`` (whose ``outstanding`` holds their keys) behind what is queued."""
        size = slide.plan.spec.batch_size
        self.batches.extend((slide, tiles[i : i + size], False) for i in range(0, len(tiles), size))

    def drop(self, slide) -> None:
        """Forget ``slide`` (it failed): its queued batches go; those in flight finish and are ignored."""
        self.batches = deque(entry for entry in self.batches if entry[0] is not slide)
        slide.outstanding.clear()

    def idle(self) -> bool:
        return not self.batches and not self.in_flight

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

    def owns(self, ref: ray.ObjectRef) -> bool:
        return ref in self.in_flight or ref in self.starting

    def ready_actors(self) -> list:
        return [self.actors[slot] for slot in sorted(self.ready)]

    def take(self, ref: ray.ObjectRef) -> list[tuple[Any, str]]:
        """Take a finished call or a started actor; returns (slide, tile key) of the tiles segmented first."""
        if ref not in self.starting:
            return self.finished(ref)
        slot = self.starting.pop(ref)
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError as err:
            if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed:
                raise RunFailed(f"the model actors cannot start: {failure_line(err)}") from None
            ray.kill(self.actors[slot])  # lost while starting, its restarts used up: a fresh one
            self._start(slot)
            return []
        if answer["unusable"]:
            raise RunFailed(f"the model actors cannot start: {answer['unusable']}")
        self.ready.add(slot)
        self.node_of[slot] = answer["node"]
        return []

    def _next_call(self, slot: int) -> tuple[Any, tuple[list, ...]] | None:
        """The next call for ``slot``: queued batches of one slide, as many as the queue's length allows
        (a tile retried on its own goes alone), else a late call of another actor's."""
        if not self.batches:
            return self._late_call(slot)
        slide, tiles, alone = self.batches.popleft()
        batches = [tiles]
        most = 1 if alone else min(self._quick_batches(),
                                   len(self.batches) // (QUEUE_PER_ACTOR * len(self.ready)))
        while len(batches) < most and self.batches[0][0] is slide and not self.batches[0][2]:
            batches.append(self.batches.popleft()[1])
        return slide, tuple(batches)

    def _quick_batches(self) -> int:
        """How many batches fit ``CALL_SECONDS`` at the median batch time so far (one until a call is back)."""
        if not self.batch_seconds:
            return 1
        return max(1, min(BATCHES_PER_CALL, int(CALL_SECONDS / max(statistics.median(self.batch_seconds), 1e-3))))

    def _late_call(self, slot: int) -> tuple[Any, tuple[list, ...]] | None:
        """The call held longest by another actor, if it is late and has no backup yet."""
        times = self.call_seconds
        least = self.plan.spec.backup_after_s
        limit = max(least, 3 * statistics.median(times)) if times else least
        now = time.monotonic()
        late = [(sent.at, ref) for ref, sent in self.in_flight.items()
                if sent.slot != slot and ref not in self.backed_up and now - sent.at > limit
                and any(t.key in sent.slide.outstanding for t in sent.tiles)]
        if not late:
            return None
        ref = min(late, key=lambda pair: pair[0])[1]
        self.backed_up.add(ref)
        return self.in_flight[ref].slide, self.in_flight[ref].batches

    def fill(self) -> None:
        for slot in sorted(self.ready):
            while self.per_slot[slot] < 2:  # one read while one computes
                call = self._next_call(slot)
                if call is None:
                    break
                slide, batches = call
                actor = self.actors[slot]
                ref = actor.run.remote(batches, slide.plan.run_id, [slide.plan_ref])
                self.in_flight[ref] = _Sent(slot, actor, slide, batches, time.monotonic())
                self.per_slot[slot] += 1
                slide.stats.batches += len(batches)
                slide.stats.calls += 1

    def finished(self, ref: ray.ObjectRef) -> list[tuple[Any, str]]:
        """Take a finished call; returns (slide, tile key) of the tiles it segmented first."""
        sent = self.in_flight.pop(ref)
        self.per_slot[sent.slot] -= 1
        self.backed_up.discard(ref)
        slide = sent.slide
        try:
            results = ray.get(ref)
            self.call_seconds.append(time.monotonic() - sent.at)
            self.batch_seconds.append(self.call_seconds[-1] / len(sent.batches))
        except ray.exceptions.RayError as err:  # retries are used up
            results = []
            lost = isinstance(err, ray.exceptions.RayActorError)
            if lost:
                if err.actor_init_failed:
                    raise RunFailed(f"the model actors cannot start: {failure_line(err)}") from None
                if self.actors[sent.slot] is sent.actor:  # its restarts are used up: a fresh actor takes the slot
                    self._doubt_node(sent.slot)
                    ray.kill(sent.actor)
                    self._start(sent.slot)
            pending = [t for t in sent.tiles if t.key in slide.outstanding]
            if len(pending) > 1:  # retry tile by tile, to find the tile at fault
                self.batches.extendleft((slide, [t], True) for t in reversed(pending))
            elif pending and not any(other.slide is slide and pending[0] in other.tiles
                                     for other in self.in_flight.values()):
                tile = pending[0]
                self.losses[slide.plan.run_id, tile.key] += lost
                if lost and self.losses[slide.plan.run_id, tile.key] < TILE_LOSSES:
                    self.batches.appendleft((slide, [tile], True))
                else:
                    slide.stats.failed.append(TileFailure.of(tile, failure_line(err)))
                    slide.outstanding.discard(tile.key)
        segmented = []
        for key, n, seconds in results:
            if key not in slide.outstanding:  # its backup's twin (or the original) came first
                continue
            slide.outstanding.discard(key)
            segmented.append((slide, key))
            slide.stats.candidates += n
            slide.stats.model_seconds += seconds
            slide.stats.tiles_segmented += 1
            slide.progress.tiles_done += 1
            slide.progress.cells += n
        return segmented

    def close(self) -> list[dict]:
        """The facts of every started actor that answers (``actor_facts``), then every actor ended."""
        facts = actor_facts(self.ready_actors())
        self.kill()
        return facts

    def kill(self) -> None:
        """End every actor now, their batches in flight with them, and those still waiting for room (so
        nothing the run asked for stays requested, and an autoscaler can scale down)."""
        for actor in self.actors:
            ray.kill(actor)


def actor_facts(actors: list, timeout: float = 10) -> list[dict]:
    """Node, GPUs, device and peak memory of every actor that answers in time: best effort, never the
    run's failure.

    An actor whose node was lost may be dead, restarting or unreachable by now. ``ray.wait`` counts a ref
    whose task *failed* as ready, so each answer is fetched on its own, and an actor whose answer failed
    or did not come is left out of the report's lists.
    """
    asked = [actor.facts.remote() for actor in actors]
    if not asked:
        return []
    ready = set(ray.wait(asked, num_returns=len(asked), timeout=timeout)[0])
    facts = []
    for ref in asked:
        if ref not in ready:
            continue
        try:
            facts.append(ray.get(ref))
        except ray.exceptions.RayError:
            continue
    return facts
