"""Model actors on GPU nodes: how many, their CPUs and GPU shares, and what they do when the device fails.

The sizing is a pure function of the nodes up and what the autoscaler can add, and the out-of-memory loop runs in a real
``SegmentWorker`` method with a segmenter that fails the way cuBLAS does; a sticky CUDA error must end
the process (so Ray restarts the actor), checked in a child process.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque

import numpy as np
import pytest
import torch

from cellsam_ray import device
from cellsam_ray.driver import capacity, model_pool
from cellsam_ray.driver.capacity import Growth, NodeGroup
from cellsam_ray.errors import UserError
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.tiling import TileGrid

SPEC = dict(input="s.zarr", nuclear=["DAPI"], weights="w.pt")


@pytest.mark.parametrize(("gpus_per_worker", "cpus_per_worker", "expected"), [
    (1.0, None, (16, {"num_gpus": 1.0, "num_cpus": 6.0})),  # half the fewest CPUs per GPU: 12 on the 8-GPU nodes
    (0.5, None, (32, {"num_gpus": 0.5, "num_cpus": 3.0})),  # two actors per GPU
    (1.0, 4, (16, {"num_gpus": 1.0, "num_cpus": 4})),  # as asked
])
def test_gpu_actors_get_their_share_of_the_nodes_cpus(gpus_per_worker, cpus_per_worker, expected):
    spec = SegmentSpec(**SPEC, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
    nodes = [{"CPU": 96.0, "GPU": 8.0}, {"CPU": 128.0, "GPU": 8.0}, {"CPU": 8.0}]  # and a CPU-only head node
    pool = capacity.size_pool(spec, 10_000, nodes, Growth("none"))
    assert (pool.count, pool.resources) == expected and pool.gpus_max == 16
    cpu_only = capacity.size_pool(spec.model_copy(update={"device": "cpu"}), 10_000, nodes, Growth("none"))
    assert (cpu_only.count, cpu_only.resources) == (1, {"num_cpus": cpus_per_worker or 127.75})


GPU_GROUP = NodeGroup("gpu_worker", {"CPU": 8.0, "GPU": 2.0}, max_count=3)
HEAD = [{"CPU": 4.0}]


@pytest.mark.parametrize(("nodes", "growth", "tiles", "expected"), [
    # No GPU up, an autoscaler that reported its groups: 3 nodes × 2 GPUs, the CPUs of that node type.
    (HEAD, Growth("config", groups=(GPU_GROUP, NodeGroup("cpu", {"CPU": 16.0}, None))), 10_000,
     (6, {"num_gpus": 1.0, "num_cpus": 2.0}, 6.0)),
    # ... capped by the work: 20 tiles in batches of 4, two batches per actor.
    (HEAD, Growth("config", groups=(GPU_GROUP,)), 20, (3, {"num_gpus": 1.0, "num_cpus": 2.0}, 6.0)),
    # One node up of the group: the group's maximum counts it already.
    ([*HEAD, {"CPU": 8.0, "GPU": 2.0}], Growth("config", groups=(GPU_GROUP,)), 10_000,
     (6, {"num_gpus": 1.0, "num_cpus": 2.0}, 6.0)),
    # An autoscaler that launched nodes for a GPU actor but does not say how many: as many as the work keeps busy.
    (HEAD, Growth("probe", adds_gpus=True), 100, (13, {"num_gpus": 1.0, "num_cpus": 1}, None)),
    # A group without a limit.
    (HEAD, Growth("config", groups=(NodeGroup("g", {"CPU": 4.0, "GPU": 1.0}, None),)), 40,
     (5, {"num_gpus": 1.0, "num_cpus": 2.0}, None)),
])
def test_a_cluster_that_can_add_gpus_is_asked_for_them(nodes, growth, tiles, expected):
    pool = capacity.size_pool(SegmentSpec(**SPEC), tiles, nodes, growth)
    assert (pool.count, pool.resources, pool.gpus_max) == expected
    assert "GPU" in pool.describe()


@pytest.mark.parametrize("growth", [Growth("none"), Growth("probe", note="the autoscaler launched nothing"),
                                    Growth("config", groups=(NodeGroup("cpu", {"CPU": 16.0}, 10),
                                                             NodeGroup("gpu", {"CPU": 8.0, "GPU": 1.0}, 0)))])
def test_a_cluster_without_gpus_now_or_by_scaling_runs_on_cpus_and_says_so(growth):
    pool = capacity.size_pool(SegmentSpec(**SPEC), 1000, HEAD, growth)
    assert pool.resources == {"num_cpus": 3.75} and pool.count == 1 and pool.gpus_max == 0
    assert "no GPU on this cluster, now or by scaling" in pool.basis
    with pytest.raises(UserError, match="--device cuda, but the cluster has no GPU and its autoscaler cannot add one"):
        capacity.size_pool(SegmentSpec(**SPEC, device="cuda"), 1000, HEAD, growth)


def test_workers_and_a_gpu_share_no_node_has():
    spec = SegmentSpec(**SPEC, workers=2)
    assert capacity.size_pool(spec, 10_000, HEAD, Growth("config", groups=(GPU_GROUP,))).count == 2
    with pytest.raises(UserError, match="--gpus-per-worker 4 is more than any node of the cluster has \\(2 GPUs\\)"):
        capacity.size_pool(SegmentSpec(**SPEC, gpus_per_worker=4), 10, HEAD, Growth("config", groups=(GPU_GROUP,)))


def test_autoscaler_v2_status_is_read_from_its_own_reply():
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.autoscaling_state.autoscaler_state_version = 7
    reply.autoscaling_state.pending_instance_requests.add(ray_node_type_name="gpu", count=2)
    request = reply.cluster_resource_state.cluster_resource_constraints.add().resource_requests.add()
    request.request.resources_bundle.update({"GPU": 1.0, "CPU": 1.0})
    seen = capacity.v2_observation(reply)
    assert (seen.update, seen.requests, seen.launching, seen.infeasible) == (7.0, [{"GPU": 1.0, "CPU": 1.0}], 2, False)
    reply.autoscaling_state.infeasible_cluster_resource_constraints.add()
    assert capacity.v2_observation(reply).infeasible


def test_what_the_nodes_up_hold():
    assert capacity.fitting([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 4.0}, {"CPU": 4.0}],
                            {"GPU": 1.0, "CPU": 2.0}) == 2  # the second node lacks CPUs, the third GPUs


@pytest.mark.parametrize(("error", "expected"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("CUBLAS_STATUS_ALLOC_FAILED"), False),
])
def test_out_of_memory_includes_cublas_and_cudnn_allocation_failures(error, expected):
    assert device.is_out_of_memory(error) is expected


class _SmallDevice:
    """Runs out of memory, as cuBLAS reports it, above 2 tiles or a decoder chunk above 16 boxes."""

    def __init__(self) -> None:
        self.box_chunk, self.calls = 64, []

    def segment_batch(self, windows, *, origins):
        self.calls.append((len(windows), self.box_chunk))
        if len(windows) > 2 or self.box_chunk > 16:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasSgemm`")
        return [dict(boxes=np.zeros((0, 4)), scores=[], masks=[]) for _ in windows]

    def on_out_of_memory(self) -> bool:
        self.box_chunk //= 2
        return True


def test_out_of_memory_shrinks_the_batch_and_the_decoder_chunk_and_redoes_only_the_rest():
    worker = model_pool.SegmentWorker.__new__(model_pool.SegmentWorker)  # the method, without a Ray actor
    worker.segmenter, worker.batch_limit = _SmallDevice(), 8
    tiles = TileGrid(height=60, width=40, tile=20, halo=4).tiles()
    done = worker._infer(tiles, [np.zeros((1, 4, 4))] * 6)
    assert sum(len(part) for part, _ in done) == 6
    assert worker.segmenter.calls == [(6, 64), (3, 32), (1, 16), (1, 16), (1, 16), (1, 16), (1, 16), (1, 16)]
    assert worker.batch_limit == 1  # kept for the actor's later batches


def test_a_sticky_cuda_error_ends_the_process():
    code = ("from cellsam_ray import device\n"
            "device.exit_if_device_broken(RuntimeError('CUDA error: an illegal memory access was encountered'))\n"
            "print('still alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "still alive" not in done.stdout and "restarting this model actor" in done.stderr
    device.exit_if_device_broken(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # returns


def test_a_call_carries_several_batches_of_one_slide_while_the_queue_is_long():
    pool = model_pool.ModelPool.__new__(model_pool.ModelPool)  # the queue alone, without actors
    pool.ready, pool.batch_seconds = {0, 1}, deque([0.01])  # quick batches
    first, second = object(), object()
    long = model_pool.QUEUE_PER_ACTOR * len(pool.ready) * model_pool.BATCHES_PER_CALL
    pool.batches = deque([(first, [n], False) for n in range(long)] + [(second, [long], False)])
    slide, batches = pool._next_call(0)
    assert slide is first and [b[0] for b in batches] == list(range(model_pool.BATCHES_PER_CALL))
    calls = []
    while pool.batches:
        calls.append(pool._next_call(0))
    assert all(len(b) == 1 for _, b in calls[-5:])  # a short queue: a batch per call, for every actor to share
    assert [s for s, b in calls if long in [t[0] for t in b]] == [second]  # slides are not mixed in a call
    pool.batches = deque([(first, [1], True), (first, [2], True)] + [(first, [n], False) for n in range(long)])
    assert pool._next_call(0) == (first, ([1],))  # a tile retried on its own goes alone
    pool.batch_seconds = deque([model_pool.CALL_SECONDS])  # slow batches: one a call, so progress moves
    pool.batches = deque([(first, [n], False) for n in range(long)])
    assert len(pool._next_call(0)[1]) == 1
