"""The paint stage: paint the kept cells that reach into one tile's core, giving that core's label pixels.

A cell homed in a neighbouring tile can reach across the seam into this core, so the task gathers the kept
cells of the 3×3 neighbourhood. Cells are painted from the lowest to the highest rank, so where two cells
overlap the higher-ranked one wins, whatever order tiles ran in.
"""

from __future__ import annotations

import numpy as np

from cellsam_ray.merge.objects import CellSet
from cellsam_ray.tiling import Tile


def rasterise_core(tile: Tile, kept_neighbourhood: list[CellSet]) -> np.ndarray:
    """The uint32 labels of ``tile``'s core. Every cell in the sets must already carry its global id."""
    h, w = tile.core_y1 - tile.core_y0, tile.core_x1 - tile.core_x0
    labels = np.zeros((h, w), dtype=np.uint32)
    cells = CellSet.concat(kept_neighbourhood)
    if not len(cells):
        return labels
    bounds = cells.bounds()
    reach = np.flatnonzero((bounds[:, 0] < tile.core_y1) & (bounds[:, 2] > tile.core_y0)
                           & (bounds[:, 1] < tile.core_x1) & (bounds[:, 3] > tile.core_x0))
    cells, bounds = cells.subset(reach), bounds[reach]  # only the cells that reach the core
    order = cells.rank_order()
    bounds = bounds[order]
    core = np.array([tile.core_y0, tile.core_x0, tile.core_y0, tile.core_x0])
    clipped = np.concatenate([np.maximum(bounds[:, :2], core[:2]),
                              np.minimum(bounds[:, 2:], [tile.core_y1, tile.core_x1])], axis=1)
    # Each cell's piece inside the core, in its mask's pixels and in the core's, as Python ints.
    inside_mask = (clipped - np.concatenate([bounds[:, :2], bounds[:, :2]], axis=1)).tolist()
    inside_core = (clipped - core).tolist()
    ids = cells.col("id").astype(np.uint32)[order].tolist()
    for i, (my0, mx0, my1, mx1), (cy0, cx0, cy1, cx1), cell in zip(order.tolist(), inside_mask, inside_core, ids):
        labels[cy0:cy1, cx0:cx1][cells.masks[i][my0:my1, mx0:mx1]] = cell
    return labels
