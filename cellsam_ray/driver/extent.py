"""Where labels can be non-zero, so that work after segmenting follows the tissue, not the rectangle.

A cell comes only from a segmented (tissue) tile, is homed at a tile of that tile's 3×3 neighbourhood, and
paints only cores of its home's neighbourhood. So only homes next to a segmented tile are reconciled, only
cores next to a home with cells are painted (and one that stays empty is not written: its chunks keep the
fill value), and at every other pyramid level only the chunks made from written regions are built.
Plain functions on the plan; ``execution`` schedules what they name.
"""

from __future__ import annotations

import itertools
from typing import Iterable

from cellsam_ray.pipeline import labels_out
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.tiling import Tile

Box = tuple[tuple[int, int], ...]  # a half-open range per label axis


def active_homes(plan: SlidePlan) -> list[tuple[int, int]]:
    """The tiles that may home a cell (any segmented tile in their 3×3 neighbourhood), in raster order."""
    grid = plan.grid
    homes = {rc for t in plan.tiles for rc in grid.neighbourhood(t.row, t.col)}
    return sorted(homes)


def core_box(plan: SlidePlan, tile: Tile) -> Box:
    """The label-array region a tile's core writes at the segmented level (the chosen t/z plane)."""
    box = []
    for axis in (a for a in plan.axes if a != "c"):
        if axis in plan.plane:
            box.append((plan.plane[axis], plan.plane[axis] + 1))
        elif axis == "y":
            box.append((tile.core_y0, tile.core_y1))
        else:
            box.append((tile.core_x0, tile.core_x1))
    return tuple(box)


def chunks_touched(plan: SlidePlan, level: int, source_boxes: Iterable[Box]) -> list[tuple[int, ...]]:
    """The chunks (or shards) of label ``level`` made, at least partly, from regions of the level it is built
    from (``labels_out.source_level``), in grid order."""
    array = labels_out.label_arrays(plan)[level]
    unit = array.shards or array.chunks
    maps = plan.label_maps[level]
    found: set[tuple[int, ...]] = set()
    for box in source_boxes:
        ranges = []
        for (lo, hi), axis_map, size in zip(box, maps, unit):
            lo, hi = (lo, hi) if axis_map.identity else axis_map.target_span(lo, hi)
            if hi <= lo:
                break
            ranges.append(range(lo // size, -(-hi // size)))
        else:
            found.update(itertools.product(*ranges))
    return sorted(found)


def chunk_boxes(plan: SlidePlan, level: int, chunks: Iterable[tuple[int, ...]]) -> list[Box]:
    """The regions of label ``level`` that the given chunks hold."""
    array = labels_out.label_arrays(plan)[level]
    unit = array.shards or array.chunks
    return [tuple((i * c, min((i + 1) * c, n)) for i, c, n in zip(index, unit, array.shape)) for index in chunks]
