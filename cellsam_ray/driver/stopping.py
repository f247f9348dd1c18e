"""A stop asked for by a signal (SIGTERM), taken where the driver's loop can stop cleanly.

A Python signal handler runs in the main thread between bytecodes, which may be in the middle of a Ray
call: an exception raised there comes out of Ray as a ``SystemError`` rather than as itself. So the handler
only records the request, and the loop (``execution.Loop.step``) raises ``RunStopped`` at its next pass,
within its wait's timeout (seconds).
"""

from __future__ import annotations

import threading

from cellsam_ray.errors import RunStopped

_requested = threading.Event()


def request() -> None:
    _requested.set()


def clear() -> None:
    _requested.clear()


def check() -> None:
    """Raise ``RunStopped`` if a stop was asked for."""
    if _requested.is_set():
        raise RunStopped("stopped (SIGTERM)")
