"""Window geometry from the model: how large a slide window CellSAM sees, and how it splits into core and halo.

CellSAM stretches every window to its square input (1024² for v1.2). The published whole-slide pipeline
(``cellsam_pipeline(use_wsi=True)``: 400-px blocks with a 56-px overlap) feeds it 512-px windows, so
cells appear 2× larger to the model than at native scale; users with the published weights expect
those answers, so that is the default (``scale="published"``). ``scale="native"`` gives windows of the
full input (1024 px for v1.2), 4× fewer tiles, for cells large enough to be seen at half the size.

A window of side W splits into a halo of W/8 on each side and a core of 3W/4: 512 → 64 + 384 + 64 and
1024 → 128 + 768 + 128. That keeps the merge's seam guarantees (``tiling.plan_grid``: band ≤ halo and
core ≥ 2·halo + band for the default 16-px band), and the label chunk is the largest divisor of the core
up to 512 px (384 for both: a 384-px core is one chunk, a 768-px core four), since every chunk must lie
in one core; on object storage each chunk is an object, and 128² chunks would make a 100k² slide's
labels hundreds of thousands of them.

These are the sizes; ``driver.windows`` decides which a run takes (a spec that names its ``tile``, ``halo``
or ``chunk`` keeps them; the bundled demo model has its own tiling, ``model/bundled.py``).
"""

from __future__ import annotations

from typing import Any

SCALES = {"published": 2, "native": 1}
"""Scale name -> model input side / window side."""
MAX_CHUNK = 512


def core_and_halo(window: int) -> tuple[int, int]:
    """A window of side ``window`` as (core, halo): a halo of an eighth on each side."""
    halo = window // 8
    return window - 2 * halo, halo


def window_geometry(image_size: int, scale: str) -> tuple[int, int, int]:
    """(core, halo, chunk) for windows of ``image_size / SCALES[scale]`` pixels."""
    core, halo = core_and_halo(image_size // SCALES[scale])
    chunk = next(c for c in range(min(MAX_CHUNK, core), 0, -1) if core % c == 0)
    return core, halo, chunk


def describe(window: int, image_size: int | None) -> dict[str, Any]:
    """What the report says about the geometry that ran: window, model input, and the scale by name."""
    named = [name for name, factor in SCALES.items() if image_size and window * factor == image_size]
    return dict(window=window, model_input=image_size, scale=named[0] if named else "custom")
