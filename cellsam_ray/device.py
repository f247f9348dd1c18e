"""A model worker's accelerator: which device it runs on, and what it does when the device fails (retry smaller
on out of memory, die on a broken context).

Kept apart from the Ray code (``execution``) so that the GPU check (``gpu_check``), which runs where Ray
is not installed, exercises the same recovery. Nothing here imports torch at import time: a segmenter that does
not use torch never pays for it, and torch's error types are looked up only if torch is already loaded.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

ALLOCATION_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory")
"""Device out-of-memory as cuBLAS, cuDNN or a raw CUDA call report it (not torch's OutOfMemoryError)."""
BROKEN_DEVICE = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
                 "illegal instruction", "uncorrectable ECC error", "launch timed out")
"""Sticky CUDA errors: the process's CUDA context is unusable afterwards, so nothing it retries can work."""


def resolve_device(device: str, *, gpu_holder: str | None = None) -> str:
    """``cpu`` or ``cuda`` for a ``device`` of ``auto``, ``cpu`` or ``cuda``.

    ``auto`` is CUDA where torch can use it, else the CPU; but a process that holds a GPU (``gpu_holder``
    says which, e.g. a model actor Ray pinned to one) must use it: a torch that cannot (a build without
    CUDA, no driver) is the node's misconfiguration, a one-line UserError naming the cause, never the
    whole slide run on the CPU while the GPU is held.
    """
    import torch

    from cellsam_ray.errors import UserError

    if device == "cpu" or (device == "auto" and not gpu_holder and not torch.cuda.is_available()):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    who = gpu_holder or "--device cuda"
    raise UserError(f"{who}: torch cannot use CUDA ({cuda_problem()}); give the node torch built for CUDA and "
                    "the NVIDIA driver, or run on CPUs with --device cpu")


def cuda_problem() -> str:
    """Why torch cannot use CUDA here, in a few words."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    try:
        torch.cuda.init()
    except Exception as err:  # noqa: BLE001 - torch's own words for it are the point
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"torch {torch.__version__}: {reason}"
    return f"torch {torch.__version__} sees no CUDA device"


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the device running out of memory: torch's error or a cuBLAS/cuDNN allocation."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in ALLOCATION_FAILURES)


def exit_if_device_broken(err: BaseException) -> None:
    """End the process on a sticky CUDA error: Ray restarts a model actor with a fresh context and retries
    its tasks, where retrying in the same process would fail the same way on every tile."""
    if isinstance(err, RuntimeError) and any(text in str(err) for text in BROKEN_DEVICE):
        print(f"the CUDA context is broken ({str(err).splitlines()[0]}): restarting this model actor",
              file=sys.stderr, flush=True)
        os._exit(1)


def release_device_memory() -> None:
    """Collect what the failed call left and hand the allocator's cached blocks back to the device."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_shrinking(items: Sequence[Item], limit: int, run: Callable[[Sequence[Item]], Result],
                  shrink: Callable[[], bool] | None = None) -> tuple[list[tuple[Sequence[Item], Result]], int]:
    """``run`` over ``items`` in parts of at most ``limit``; returns each part with its result, and the limit.

    Out of device memory halves the limit (down to one item) and calls ``shrink`` (whether it could make
    the work smaller, e.g. CellSAM's decoder chunk), then redoes the unfinished part. Memory is released
    after the ``except`` block, once the traceback no longer holds the failed call's tensors. Out of
    memory on one item with nothing left to shrink is raised.
    """
    done: list[tuple[Sequence[Item], Result]] = []
    finished = 0
    while finished < len(items):
        n = min(limit, len(items) - finished)
        part = items[finished : finished + n]
        failure = None
        try:
            done.append((part, run(part)))
            finished += n
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            failure = str(err).splitlines()[0] if str(err) else type(err).__name__
        if failure:
            shrunk = bool(shrink and shrink())
            if n == 1 and not shrunk:
                raise RuntimeError(f"out of device memory on one tile, with nothing left to shrink: {failure}")
            limit = max(n // 2, 1)
            print(f"out of device memory on {n} tiles: batches of {limit} from now on"
                  f"{' and smaller work per tile' if shrunk else ''}", file=sys.stderr, flush=True)
            release_device_memory()
    return done, limit
