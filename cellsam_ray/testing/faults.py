"""A segmenter that fails on purpose, so tests (and a new deployment) can prove recovery with real faults.

``FaultySegmenter`` answers like the ground-truth oracle (its ``labels``), leaves one file per window it
segments so a test can count what was computed, and injects the faults its options ask for. They are
keyword arguments, set as any segmenter's are, in the spec's ``segmenter_options`` (``--segmenter-option
KEY=VALUE``), which reach every model actor with the plan; a window's position is ``"y,x"``:

- ``labels`` (required): the oracle's cells (``oracle.GroundTruthSegmenter``).
- ``folder`` (required): a folder shared by the actors; each window segmented leaves
  ``calls/<y>_<x>.<unique>``, named by the window's origin, holding where it ran: the Ray node and the GPU
  ids Ray gave the actor (``window_places``).
- ``crash_at="y,x"``: the actor's process dies (``os._exit``) on that window, the first time only (a
  ``crashed`` marker in the folder remembers it).
- ``fail_at="y,x"``: raises on that window, every time until a ``mended`` file appears in the folder: the
  options are part of the resume fingerprint, so a test mends the cause, as a user would, and reruns the
  same spec.
- ``oom_above=n``: a batch of more than n windows raises CUDA out of memory; each such batch leaves
  ``oom/<n>.<unique>``.
- ``delay=s``: sleeps s seconds per window (time to kill a driver mid-run).
- ``hold_at="y,x"``: on that window, leaves ``held/<pid>`` (the process holding it) and waits until a
  ``release`` file appears in the folder, so a test can act at a known point of a run.
- ``barrier=n``: no window is segmented before n segmenters have been built (each leaves ``built/<pid>``),
  so a test that counts a run's actors sees every one start before the work runs out.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cellsam_ray.testing.oracle import GroundTruthSegmenter


def _origin(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    y, x = (int(v) for v in value.split(","))
    return (y, x)


def window_places(folder: str | Path) -> list[dict]:
    """Where each window segmented so far ran (with repeats): its origin, Ray node and GPU ids."""
    calls = Path(folder, "calls")
    files = sorted(calls.iterdir()) if calls.is_dir() else []
    return [dict(json.loads(p.read_text()), origin=tuple(int(v) for v in p.name.split(".")[0].split("_")))
            for p in files]


def window_calls(folder: str | Path) -> list[tuple[int, int]]:
    """The origin of every window segmented so far (with repeats), read from ``calls/``."""
    calls = Path(folder, "calls")
    names = sorted(p.name for p in calls.iterdir()) if calls.is_dir() else []
    return [tuple(int(v) for v in name.split(".")[0].split("_")) for name in names]


def _place() -> dict:
    """The Ray node and GPU ids of this process (an actor), or nulls outside Ray."""
    import ray

    if not ray.is_initialized():
        return dict(node=None, gpus=[])
    return dict(node=ray.get_runtime_context().get_node_id(), gpus=[str(g) for g in ray.get_gpu_ids()])


class FaultySegmenter:
    def __init__(self, labels: str, folder: str, *, crash_at: str | None = None, fail_at: str | None = None,
                 oom_above: int = 0, delay: float = 0, hold_at: str | None = None, barrier: int = 0) -> None:
        self.oracle = GroundTruthSegmenter(labels)
        self.folder = Path(folder)
        self.crash_at, self.fail_at, self.hold_at = _origin(crash_at), _origin(fail_at), _origin(hold_at)
        self.oom_above, self.delay, self.barrier = oom_above, delay, barrier
        for sub in ("calls", "writing", "oom", "held", "built"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "built" / str(os.getpid())).touch()

    def segment(self, window: np.ndarray, *, origin: tuple[int, int]) -> dict[str, Any]:
        origin = (int(origin[0]), int(origin[1]))
        if origin == self.crash_at:
            marker = self.folder / "crashed"
            if not marker.exists():
                marker.touch()
                os._exit(1)  # as a segfault or the kernel's OOM killer would: no exception, no cleanup
        if origin == self.fail_at and not (self.folder / "mended").exists():
            raise RuntimeError(f"injected failure at window {origin}")
        if origin == self.hold_at:
            self._hold()
        if self.barrier:
            self._wait(lambda: len(list((self.folder / "built").iterdir())) >= self.barrier,
                       f"{self.barrier} segmenters built")
        time.sleep(self.delay)
        name = f"{origin[0]}_{origin[1]}.{uuid.uuid4().hex}"
        (self.folder / "writing" / name).write_text(json.dumps(_place()))  # whole when it appears in calls/
        os.replace(self.folder / "writing" / name, self.folder / "calls" / name)
        return self.oracle.segment(window, origin=origin)

    def _hold(self) -> None:
        (self.folder / "held" / str(os.getpid())).touch()
        self._wait((self.folder / "release").exists, "released")

    @staticmethod
    def _wait(condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {timeout} s and never {what}")
            time.sleep(0.05)

    def segment_batch(self, windows: list[np.ndarray], *, origins: list[tuple[int, int]]) -> list[dict[str, Any]]:
        if self.oom_above and len(windows) > self.oom_above:
            import torch

            (self.folder / "oom" / f"{len(windows)}.{uuid.uuid4().hex}").touch()
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected for a batch of {len(windows)})")
        return [self.segment(w, origin=o) for w, o in zip(windows, origins)]
