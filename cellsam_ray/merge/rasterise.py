"""Stage D: paint the kept cells that reach into one tile's core, giving that core's label pixels.

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
    ids = cells.col("id").astype(np.uint32)
    reach = ((bounds[:, 0] < tile.core_y1) & (bounds[:, 2] > tile.core_y0)
             & (bounds[:, 1] < tile.core_x1) & (bounds[:, 3] > tile.core_x0))
    order = cells.rank_order()
    clipped = np.stack([np.maximum(bounds[:, 0], tile.core_y0), np.maximum(bounds[:, 1], tile.core_x0),
                        np.minimum(bounds[:, 2], tile.core_y1), np.minimum(bounds[:, 3], tile.core_x1)], axis=1)
    for i in order[reach[order]].tolist():  # only the cells that reach the core, in rank order
        y0, x0 = int(bounds[i, 0]), int(bounds[i, 1])
        oy0, ox0, oy1, ox1 = clipped[i].tolist()
        piece = cells.masks[i][oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0]
        target = labels[oy0 - tile.core_y0 : oy1 - tile.core_y0, ox0 - tile.core_x0 : ox1 - tile.core_x0]
        target[piece] = ids[i]
    return labels
