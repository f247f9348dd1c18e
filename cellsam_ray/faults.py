"""A segmenter that fails on purpose, so tests (and a new deployment) can prove recovery with real faults.

``FaultySegmenter`` answers like the ground-truth oracle (``CELLSAM_RAY_ORACLE_LABELS``), leaves one file
per window it segments so a test can count what was computed, and injects the faults the environment
asks for. The driver forwards ``CELLSAM_RAY_*`` variables to the model actors, so a test configures it
the way a user configures any segmenter built with no arguments:

- ``CELLSAM_RAY_FAULT_DIR`` (required): a folder shared by the actors; each window segmented leaves
  ``calls/<y>_<x>.<unique>``, named by the window's origin.
- ``CELLSAM_RAY_FAULT_CRASH_AT=y,x``: the actor's process dies (``os._exit``) on that window, the first time
  only (a ``crashed`` marker in the folder remembers it).
- ``CELLSAM_RAY_FAULT_FAIL_AT=y,x``: raises on that window, every time.
- ``CELLSAM_RAY_FAULT_OOM_ABOVE=n``: a batch of more than n windows raises CUDA out of memory; each such
  batch leaves ``oom/<n>.<unique>``.
- ``CELLSAM_RAY_FAULT_DELAY=s``: sleeps s seconds per window (time to kill a driver mid-run).
- ``CELLSAM_RAY_FAULT_HOLD_AT=y,x``: on that window, leaves ``held/<pid>`` (the process holding it) and
  waits until a ``release`` file appears in the folder, so a test can act at a known point of a run.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cellsam_ray.oracle import GroundTruthSegmenter


def _origin(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    y, x = (int(v) for v in value.split(","))
    return (y, x)


def window_calls(folder: str | Path) -> list[tuple[int, int]]:
    """The origin of every window segmented so far (with repeats), read from ``calls/``."""
    calls = Path(folder, "calls")
    names = sorted(p.name for p in calls.iterdir()) if calls.is_dir() else []
    return [tuple(int(v) for v in name.split(".")[0].split("_")) for name in names]


class FaultySegmenter:
    def __init__(self) -> None:
        self.oracle = GroundTruthSegmenter()
        self.folder = Path(os.environ["CELLSAM_RAY_FAULT_DIR"])
        self.crash_at = _origin(os.environ.get("CELLSAM_RAY_FAULT_CRASH_AT"))
        self.fail_at = _origin(os.environ.get("CELLSAM_RAY_FAULT_FAIL_AT"))
        self.oom_above = int(os.environ.get("CELLSAM_RAY_FAULT_OOM_ABOVE", "0"))
        self.delay = float(os.environ.get("CELLSAM_RAY_FAULT_DELAY", "0"))
        self.hold_at = _origin(os.environ.get("CELLSAM_RAY_FAULT_HOLD_AT"))
        for sub in ("calls", "oom", "held"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)

    def segment(self, window: np.ndarray, *, origin: tuple[int, int]) -> dict[str, Any]:
        origin = (int(origin[0]), int(origin[1]))
        if origin == self.crash_at:
            marker = self.folder / "crashed"
            if not marker.exists():
                marker.touch()
                os._exit(1)  # as a segfault or the kernel's OOM killer would: no exception, no cleanup
        if origin == self.fail_at:
            raise RuntimeError(f"injected failure at window {origin}")
        if origin == self.hold_at:
            self._hold()
        time.sleep(self.delay)
        (self.folder / "calls" / f"{origin[0]}_{origin[1]}.{uuid.uuid4().hex}").touch()
        return self.oracle.segment(window, origin=origin)

    def _hold(self, timeout: float = 300) -> None:
        (self.folder / "held" / str(os.getpid())).touch()
        deadline = time.monotonic() + timeout
        while not (self.folder / "release").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"held for {timeout} s and never released")
            time.sleep(0.05)

    def segment_batch(self, windows: list[np.ndarray], *, origins: list[tuple[int, int]]) -> list[dict[str, Any]]:
        if self.oom_above and len(windows) > self.oom_above:
            import torch

            (self.folder / "oom" / f"{len(windows)}.{uuid.uuid4().hex}").touch()
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected for a batch of {len(windows)})")
        return [self.segment(w, origin=o) for w, o in zip(windows, origins)]
