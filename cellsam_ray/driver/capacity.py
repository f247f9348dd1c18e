"""How many model actors a run asks for, and what each asks for: from the nodes that are up and from what
the cluster's autoscaler can add.

Clusters whose GPUs cost money by the hour scale their GPU group from zero (a KubeRay worker group with
``minReplicas: 0``, a ``ray up`` node type with ``min_workers: 0``). ``ray.cluster_resources()`` counts only
the nodes that are up, so a run that sized itself from it alone would run on the head's CPU and never ask
for a GPU. A run asks for what the cluster can become instead, read from what Ray exposes:

1. the cluster config an autoscaler reports to the GCS (its node groups, their resources and largest
   counts; what Ray Data reads): the GPUs the cluster may scale to, exactly;
2. else, where an autoscaler manages node types (its status in the GCS: the v1 monitor's, whose node types
   are not the read-only provider's one-type-per-node, or autoscaler v2's), a probe: one actor's bundle
   beyond what the nodes up hold is asked with ``ray.autoscaler.sdk.request_resources``. An autoscaler that
   launches nodes for it can add GPUs (how many it alone knows: the run asks for as many actors as the work
   keeps busy, and those it never places stay pending, start nothing and end with the run); one that has
   seen the request in two updates and launched nothing cannot. The request is withdrawn either way: the
   actors' own demand replaces it, and it ends with them;
3. else the nodes up are all there is.

Nothing here holds a GPU: ``size_pool`` is a pure function of what was found, so its rules are tested
without a cluster.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import ray

from cellsam_ray.errors import UserError

CPU_RESERVE = 0.25  # CPUs the model actors leave free on a CPU-only cluster, for Ray's own processes
BATCHES_PER_ACTOR = 2
"""An actor keeps two batches in flight (one read while one computes): with fewer tiles than that it idles,
so a run asks for no more actors than ``tiles / (2 × batch_size)``."""
PROBE_TIMEOUT_S = 60.0
"""How long the probe waits for the autoscaler to answer (it updates every 5 s by default)."""


@dataclass(frozen=True)
class NodeGroup:
    """A kind of node the autoscaler may add: its resources and how many of it there may be (None: no limit)."""

    name: str
    resources: dict
    max_count: int | None


@dataclass(frozen=True)
class Growth:
    """What the autoscaler can add, as far as the run could tell: the node groups it reported (``groups``,
    exact), or only whether it launched nodes when asked for a GPU actor (``adds_gpus``)."""

    source: str  # "none" (no autoscaler), "config" (the reported node groups) or "probe"
    groups: tuple[NodeGroup, ...] = ()
    adds_gpus: bool = False
    note: str = ""  # what the probe saw, in a few words

    @property
    def gpu_groups(self) -> tuple[NodeGroup, ...]:
        return tuple(g for g in self.groups if g.resources.get("GPU", 0) > 0 and g.max_count != 0)


@dataclass(frozen=True)
class Pool:
    """The model actors a run asks for: how many, what each holds, and why (one line for the user)."""

    count: int
    resources: dict  # Ray options: num_gpus, num_cpus
    basis: str
    gpus_up: float
    gpus_max: float | None  # the GPUs the cluster may scale to; None where the autoscaler does not say
    growth: str = "none"

    @property
    def each(self) -> dict[str, float]:
        """What each actor holds, as Ray names the resources (GPU, CPU)."""
        names = {"num_gpus": "GPU", "num_cpus": "CPU"}
        return {names[option]: float(value) for option, value in self.resources.items()}

    def describe(self) -> str:
        each = ", ".join(f"{value:g} {name}" for name, value in self.each.items())
        return f"{self.count} model actor(s) of {each} each: {self.basis}"


def size_pool(spec, tiles: int, nodes: list[dict], growth: Growth) -> Pool:
    """The pool for ``tiles`` tiles on a cluster whose live nodes have ``nodes`` resources and which may
    grow by ``growth``.

    A GPU actor does host work besides the model (reading windows, CellSAM's cleanup, the candidates), so
    it asks for ``cpus_per_worker`` CPUs, by default half its share of the GPU nodes' CPUs (the fewest CPUs
    per GPU among the nodes up or the groups that may come, times ``gpus_per_worker``; 1 where none is
    known yet): the other half runs the stages after segment as the tiles stream in. Without GPUs the model
    is the bottleneck, so the actors share the cluster's CPUs less a reserve for small I/O work, and no actor asks
    for more than the largest node has less the reserve: an actor is one process, and a request no node
    can meet waits forever. ``workers`` sets the count outright.
    """
    gpus_up = sum(node.get("GPU", 0) for node in nodes)
    busy = max(1, math.ceil(tiles / (BATCHES_PER_ACTOR * spec.batch_size)))
    gpu_shapes = [node for node in nodes if node.get("GPU")] + [g.resources for g in growth.gpu_groups]
    if spec.device != "cpu" and (gpus_up or growth.gpu_groups or growth.adds_gpus):
        most = max((shape["GPU"] for shape in gpu_shapes), default=None)
        if most is not None and spec.gpus_per_worker > most:
            raise UserError(f"--gpus-per-worker {spec.gpus_per_worker:g} is more than any node of the cluster has "
                            f"({most:g} GPUs): an actor is one process on one node, and would wait forever")
        gpus_max, basis = _gpus_max(gpus_up, growth)
        room = busy if gpus_max is None else max(int(gpus_max // spec.gpus_per_worker), 1)
        per_gpu = min((shape.get("CPU", 1) / shape["GPU"] for shape in gpu_shapes), default=2)
        cpus = spec.cpus_per_worker or max(round(per_gpu * spec.gpus_per_worker / 2, 2), 1)
        return Pool(count=spec.workers or min(room, busy), resources={"num_gpus": spec.gpus_per_worker,
                    "num_cpus": cpus}, basis=basis, gpus_up=gpus_up, gpus_max=gpus_max, growth=growth.source)
    if spec.device == "cuda":
        raise UserError("--device cuda, but the cluster has no GPU and its autoscaler cannot add one"
                        f"{f' ({growth.note})' if growth.note else ''}")
    cpus = sum(node.get("CPU", 0) for node in nodes) or 1
    largest_node = max((node.get("CPU", 0) for node in nodes), default=cpus)
    workers = spec.workers or 1
    share = spec.cpus_per_worker or (cpus - CPU_RESERVE) / workers
    basis = ("on CPUs, as --device cpu asks" if spec.device == "cpu" else
             f"no GPU on this cluster, now or by scaling ({growth.note or 'no autoscaler'}): the model runs on CPUs")
    return Pool(count=workers, resources={"num_cpus": round(min(share, largest_node - CPU_RESERVE), 2)},
                basis=basis, gpus_up=gpus_up, gpus_max=0.0 if spec.device != "cpu" else None, growth=growth.source)


def _gpus_max(gpus_up: float, growth: Growth) -> tuple[float | None, str]:
    """The GPUs the cluster may scale to (None: unknown, the autoscaler's to say) and the reason, in words."""
    if growth.source == "config":
        groups = growth.gpu_groups
        if any(g.max_count is None for g in groups):
            return None, f"{gpus_up:g} GPU(s) up; the autoscaler may add GPU nodes without limit"
        gpus_max = max(gpus_up, sum(g.resources["GPU"] * g.max_count for g in groups))
        names = ", ".join(f"{g.name} up to {g.max_count}" for g in groups)
        return gpus_max, f"{gpus_up:g} GPU(s) up, up to {gpus_max:g} as the autoscaler may add nodes ({names})"
    if growth.adds_gpus:
        return None, (f"{gpus_up:g} GPU(s) up; the autoscaler adds GPU nodes ({growth.note}), as many as it may: "
                      "actors it cannot place wait")
    return gpus_up, f"{gpus_up:g} GPU(s) up, and no autoscaler that adds more"


# ------------------------------------------------------------------------------------- the live cluster
def live_nodes() -> list[dict]:
    """The resources of every node that is up."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def plan_pool(spec, tiles: int) -> Pool:
    """``size_pool`` for the cluster this process is connected to, the autoscaler asked as the module says
    (not for ``--device cpu``, nor where ``workers`` is given with GPUs up)."""
    nodes = live_nodes()
    if spec.device == "cpu" or (spec.workers and any(node.get("GPU") for node in nodes)):
        return size_pool(spec, tiles, nodes, Growth("none"))
    return size_pool(spec, tiles, nodes, autoscaler_growth(spec, nodes))


def autoscaler_growth(spec, nodes: list[dict], timeout: float = PROBE_TIMEOUT_S) -> Growth:
    """What the cluster's autoscaler can add (see the module's docstring for the order things are read in)."""
    groups = reported_groups()
    if groups is not None:
        return Growth("config", groups=groups)
    status = _status_reader()
    if status is None:
        return Growth("none")
    bundle = {"GPU": spec.gpus_per_worker, "CPU": spec.cpus_per_worker or 1}
    return probe(status, bundle, nodes, timeout)


def reported_groups() -> tuple[NodeGroup, ...] | None:
    """The node groups of the cluster config an autoscaler reported to the GCS, if one did."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return tuple(NodeGroup(g.name, dict(g.resources), None if g.max_count == -1 else g.max_count)
                 for g in config.node_group_configs)


@dataclass(frozen=True)
class Observation:
    """One look at the autoscaler's status: which update it was, the bundles asked with request_resources
    that it saw, the nodes it is launching, and whether it called the request infeasible (v2 says so)."""

    update: float
    requests: list[dict] = field(default_factory=list)
    launching: int = 0
    infeasible: bool = False


def _status_reader():
    """A function returning an ``Observation`` of the autoscaler's status, or None where no autoscaler
    manages node types (none at all, or the v1 monitor's read-only provider of a fixed cluster)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        return _v2_observation
    first = _v1_status()
    if first is None:
        return None
    from ray.autoscaler._private.util import format_readonly_node_type

    types = (first.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    if all(kind == format_readonly_node_type(node) for node, kind in types.items()):
        return None  # a fixed cluster: the read-only provider names each node's type after the node
    return lambda: _v1_observation(_v1_status())


def _v1_status() -> dict | None:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else None


def _v1_observation(status: dict) -> Observation:
    report, metrics = status.get("autoscaler_report") or {}, status.get("load_metrics_report") or {}
    launching = sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])
    return Observation(update=status.get("time", 0.0), launching=launching,
                       requests=[bundle for bundle, _ in metrics.get("request_demand") or []])


def _v2_observation() -> Observation:
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status())
    return v2_observation(reply)


def v2_observation(reply) -> Observation:
    """An ``Observation`` of autoscaler v2's ``GetClusterStatusReply``."""
    state, resources = reply.autoscaling_state, reply.cluster_resource_state
    requests = [dict(r.request.resources_bundle) for c in resources.cluster_resource_constraints
                for r in c.resource_requests]
    launching = sum(r.count for r in state.pending_instance_requests) + len(state.pending_instances)
    return Observation(update=float(state.autoscaler_state_version), requests=requests, launching=launching,
                       infeasible=len(state.infeasible_cluster_resource_constraints) > 0)


def probe(read, bundle: dict, nodes: list[dict], timeout: float = PROBE_TIMEOUT_S) -> Growth:
    """Ask the autoscaler for one ``bundle`` more than the nodes up hold and watch what it does."""
    from ray.autoscaler.sdk import request_resources

    asked = [bundle] * (fitting(nodes, bundle) + 1)
    before = read()
    gpus_before = sum(node.get("GPU", 0) for node in nodes)
    request_resources(bundles=asked)
    try:
        updates: set[float] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = read()
            if any(b.get("GPU") for b in seen.requests) and seen.update != before.update:
                if seen.launching > before.launching or sum(n.get("GPU", 0) for n in live_nodes()) > gpus_before:
                    return Growth("probe", adds_gpus=True, note="it launched nodes for a GPU actor")
                updates.add(seen.update)
                if seen.infeasible or len(updates) >= 2:
                    return Growth("probe", note="the autoscaler launched nothing for a GPU actor")
            time.sleep(0.5)
        return Growth("probe", note=f"the autoscaler did not answer a request for a GPU within {timeout:g} s")
    finally:
        request_resources(bundles=[])


def fitting(nodes: list[dict], bundle: dict) -> int:
    """How many ``bundle``s the nodes hold at once (each whole on one node)."""
    return sum(min(int(node.get(k, 0) // v) for k, v in bundle.items() if v > 0) for node in nodes)
