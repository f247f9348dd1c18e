"""Stage A's output: turn one window's detections into candidates in level pixels.

A tile keeps the detections whose box centre lies in its core (it owns them) or within ``band`` pixels
outside it (band copies, used only to reconcile seams); the rest of its halo belongs to its neighbours.
Masks are clipped to the image and to the window, and a mask cut by the window's edge is flagged: for
such a cell the tile did not see the whole object.
"""

from __future__ import annotations

import numpy as np

from cellsam_ray.merge.objects import META_COLUMNS, CellSet
from cellsam_ray.segmenter import Detections
from cellsam_ray.tiling import Tile, TileGrid


def tile_candidates(detections: Detections, tile: Tile, grid: TileGrid, band: int) -> CellSet:
    """The window's detections this tile keeps, as candidates: the geometry of every box at once, then a
    pass over the kept masks only to cut each to the image, the window and its own extent."""
    wy0, wx0 = tile.origin
    # The part of the window that lies inside the image: masks are clipped to it.
    vy0, vx0 = max(wy0, 0), max(wx0, 0)
    vy1 = min(wy0 + tile.window_size, grid.height)
    vx1 = min(wx0 + tile.window_size, grid.width)
    x1, y1, x2, y2 = detections.boxes.reshape(-1, 4).T
    # The centre of the box's part inside the image: past the border a box has no meaning, and a cell cut
    # by the image edge must still have its centre, and so its home, inside the image.
    cy = (np.maximum(wy0 + y1, 0) + np.minimum(wy0 + y2, grid.height)) / 2
    cx = (np.maximum(wx0 + x1, 0) + np.minimum(wx0 + x2, grid.width)) / 2
    # The box rounded outward to whole pixels (the contract in ``segmenter``), in level pixels, clipped to the view.
    gy0, gx0 = wy0 + np.floor(y1).astype(np.int64), wx0 + np.floor(x1).astype(np.int64)
    cy0, cx0 = np.maximum(gy0, vy0), np.maximum(gx0, vx0)
    cy1 = np.minimum(wy0 + np.ceil(y2).astype(np.int64), vy1)
    cx1 = np.minimum(wx0 + np.ceil(x2).astype(np.int64), vx1)
    owned = ((tile.core_y0 - band <= cy) & (cy < tile.core_y1 + band) & (tile.core_x0 - band <= cx)
             & (cx < tile.core_x1 + band) & (cy >= 0) & (cy < grid.height) & (cx >= 0) & (cx < grid.width)
             & (cy1 > cy0) & (cx1 > cx0))
    kept, masks, extents = [], [], []
    for i in np.flatnonzero(owned).tolist():
        mask = detections.masks[i][cy0[i] - gy0[i] : cy1[i] - gy0[i], cx0[i] - gx0[i] : cx1[i] - gx0[i]]
        rows_hit = np.flatnonzero(mask.any(axis=1))
        if not rows_hit.size:
            continue
        # Trim to the mask's own extent so the stored record is small and its bounds are exact.
        cols_hit = np.flatnonzero(mask.any(axis=0))
        top, bottom, left, right = int(rows_hit[0]), int(rows_hit[-1]) + 1, int(cols_hit[0]), int(cols_hit[-1]) + 1
        masks.append(np.ascontiguousarray(mask[top:bottom, left:right]))
        extents.append((top, left, bottom, right))
        kept.append(i)
    index = np.array(kept, dtype=np.int64)
    top, left, bottom, right = np.array(extents, dtype=np.int64).reshape(-1, 4).T
    my0, mx0 = cy0[index] + top, cx0[index] + left
    my1, mx1 = cy0[index] + bottom, cx0[index] + right
    cy, cx = cy[index], cx[index]
    touches = (((my0 == vy0) & (vy0 > 0)) | ((mx0 == vx0) & (vx0 > 0))
               | ((my1 == vy1) & (vy1 < grid.height)) | ((mx1 == vx1) & (vx1 < grid.width)))
    size = wy0 + tile.window_size, wx0 + tile.window_size
    columns = dict(
        y0=my0, x0=mx0, cy=cy, cx=cx, score=detections.scores[index], iou=detections.ious[index],
        producer_row=tile.row, producer_col=tile.col, local_index=index,
        home_row=cy // grid.tile, home_col=cx // grid.tile,
        centrality=np.minimum.reduce([cy - wy0, cx - wx0, size[0] - cy, size[1] - cx]),
        touches_window_edge=touches, oversized=np.maximum(y2 - y1, x2 - x1)[index] > 2 * grid.halo, id=0,
    )
    meta = np.zeros((len(index), len(META_COLUMNS)), dtype=np.float64)
    for k, name in enumerate(META_COLUMNS):
        meta[:, k] = columns[name]
    return CellSet(meta=meta, masks=masks)
