"""Model actors on GPU nodes: their CPUs and GPU shares, and what they do when the device fails.

The sizing is a pure function of the cluster's resources, and the out-of-memory loop runs in a real
``SegmentWorker`` method with a segmenter that fails the way cuBLAS does; a sticky CUDA error must end
the process (so Ray restarts the actor), checked in a child process.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cellsam_ray import device, execution
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
    cluster = {"CPU": 232.0, "GPU": 16.0}
    assert execution._model_actors(spec, cluster, nodes) == expected
    cpu_only = execution._model_actors(spec.model_copy(update={"device": "cpu"}), cluster, nodes)
    assert cpu_only == (1, {"num_cpus": cpus_per_worker or 127.75})


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
    worker = execution.SegmentWorker.__new__(execution.SegmentWorker)  # the method, without a Ray actor
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
