"""How large the slide's cells are, from a first look through the bundled model at a few windows.

The bundled demo model sees a window at the slide's resolution, 256 px, and finds cells best at about
``bundled.CELL_DIAMETER``; much larger cells it finds in pieces, and cells over twice its 32-px halo are
cut at the seams. So with ``cell_diameter="auto"`` (the default for the bundled model) ``driver.windows``
asks ``look`` before it chooses the windows: up to ``SAMPLE`` windows centred on tissue tiles spread over
the slide, once at each size of ``LOOKS`` (the model's own 256 px, and 512 px shown at half size), on the
CPU (the model has 1.7 M parameters: a few seconds), measuring the cells found whole (not those cut by a
window's edge). A look at the wrong scale misleads: a fine one finds fragments of cells too large for it, a
coarse one misses and merges cells too small. So the finest look whose cells appeared no larger than
``TRUSTED`` is taken (``best_look``). With fewer than ``MIN_CELLS`` whole cells in every look no diameter is
measured, and the windows stay the model's own.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cellsam_ray.model import bundled
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.pipeline.source import cellsam_segmenter, read_windows
from cellsam_ray.report import CellSize
from cellsam_ray.tiling import Tile

SAMPLE = 16
MIN_CELLS = 10
LOOKS = (256, 512)
TRUSTED = 40.0
"""px: a look is trusted for cells that appear at most this large to the model. On seeds 700-705 the
256-px look measured cells of 9-40 px within 10 %, and underestimated cells of 55-71 px by 15-20 % (or
found too few whole to measure); the 512-px look overestimates cells under ~16 px by up to 2x."""


def look(plan: SlidePlan) -> CellSize:
    """The cells' size from a first look through each window size of ``LOOKS`` (``best_look`` of them), with
    the plan's model on this process's CPU."""
    segmenter = _cpu_segmenter(plan)
    return best_look([measure(plan, segmenter, window) for window in LOOKS])


def measure(plan: SlidePlan, segmenter, window: int) -> CellSize:
    """The median diameter (slide px) of the cells ``segmenter`` finds whole in up to ``SAMPLE`` windows of
    ``window`` px (stretched to the model's input), centred on tissue tiles spread over the slide."""
    picked = [plan.tiles[i] for i in sorted(set(np.linspace(0, len(plan.tiles) - 1, SAMPLE).round().astype(int)))
              ] if plan.tiles else []
    if not picked:
        return CellSize(source="measured", cells=0, windows=0, look=window)
    centred = [_centred(tile, window) for tile in picked]
    found = segmenter.segment_batch(read_windows(plan, centred), origins=[t.origin for t in centred])
    diameters = np.concatenate([_whole_cell_diameters(f, window) for f in found])
    diameter = round(float(np.median(diameters)), 1) if len(diameters) >= MIN_CELLS else None
    return CellSize(diameter=diameter, source="measured", cells=len(diameters), windows=len(centred), look=window)


def _cpu_segmenter(plan: SlidePlan):
    """The plan's model in this process, on the CPU: the first look must not wait for (or hold) a GPU."""
    return cellsam_segmenter(plan.spec.model_copy(update=dict(device="cpu", mode="fast")))


def best_look(looks: list[CellSize]) -> CellSize:
    """The finest look (``looks`` finest first) whose cells appeared to the model at most ``TRUSTED`` px; else
    the coarsest that measured any; else the first. A finer look sees small cells better, but cells that
    appear larger than ``TRUSTED`` it starts to find in pieces."""
    model_input = bundled.TILE + 2 * bundled.HALO
    measured = [look for look in looks if look.diameter]
    trusted = [look for look in measured if look.diameter * model_input / look.look <= TRUSTED]
    return trusted[0] if trusted else measured[-1] if measured else looks[0]


def _centred(tile: Tile, window: int) -> Tile:
    """The tile with a window of ``window`` px centred on its core (a look, not a unit of work)."""
    cy, cx = (tile.core_y0 + tile.core_y1) // 2, (tile.core_x0 + tile.core_x1) // 2
    return replace(tile, window_y0=cy - window // 2, window_x0=cx - window // 2, window_size=window)


def _whole_cell_diameters(found: dict, window: int) -> np.ndarray:
    """Equivalent diameters, sqrt(4·area/π), of the masks whose box does not reach the window's edge."""
    boxes = np.asarray(found["boxes"]).reshape(-1, 4)
    inside = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < window) & (boxes[:, 3] < window)
    areas = np.array([np.count_nonzero(m) for m, keep in zip(found["masks"], inside) if keep], dtype=np.float64)
    return np.sqrt(4 * areas / np.pi)
