"""Stage A's output: turn one window's detections into candidates in level pixels.

A tile keeps the detections whose box centre lies in its core (it owns them) or within ``band`` pixels
outside it (band copies, used only to reconcile seams); the rest of its halo belongs to its neighbours.
Masks are clipped to the image and to the window, and a mask cut by the window's edge is flagged: for
such a cell the tile did not see the whole object.
"""

from __future__ import annotations

import numpy as np

from cellsam_ray.merge.objects import META_COLUMNS, CellSet
from cellsam_ray.segmenter import Detections, box_pixel_extent
from cellsam_ray.tiling import Tile, TileGrid


def tile_candidates(detections: Detections, tile: Tile, grid: TileGrid, band: int) -> CellSet:
    wy0, wx0 = tile.origin
    # The part of the window that lies inside the image: masks are clipped to it.
    vy0, vx0 = max(wy0, 0), max(wx0, 0)
    vy1 = min(wy0 + tile.window_size, grid.height)
    vx1 = min(wx0 + tile.window_size, grid.width)
    rows, masks = [], []
    for i in range(len(detections)):
        x1, y1, x2, y2 = detections.boxes[i]
        # The centre of the box's part inside the image: past the border a box has no meaning, and a
        # cell cut by the image edge must still have its centre, and so its home, inside the image.
        cy = (max(wy0 + y1, 0) + min(wy0 + y2, grid.height)) / 2
        cx = (max(wx0 + x1, 0) + min(wx0 + x2, grid.width)) / 2
        if not (
            tile.core_y0 - band <= cy < tile.core_y1 + band and tile.core_x0 - band <= cx < tile.core_x1 + band
        ):
            continue
        home = grid.home_of(cy, cx)
        if home is None:
            continue
        r0, c0, r1, c1 = box_pixel_extent(detections.boxes[i])
        gy0, gx0 = wy0 + r0, wx0 + c0
        cy0, cx0 = max(gy0, vy0), max(gx0, vx0)
        cy1, cx1 = min(wy0 + r1, vy1), min(wx0 + c1, vx1)
        if cy1 <= cy0 or cx1 <= cx0:
            continue
        mask = detections.masks[i][cy0 - gy0 : cy1 - gy0, cx0 - gx0 : cx1 - gx0]
        rows_hit = mask.any(axis=1)
        if not rows_hit.any():
            continue
        # Trim to the mask's own extent so the stored record is small and its bounds are exact.
        ys, xs = np.flatnonzero(rows_hit), np.flatnonzero(mask.any(axis=0))
        mask = np.ascontiguousarray(mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1])
        my0, mx0 = cy0 + ys[0], cx0 + xs[0]
        my1, mx1 = my0 + mask.shape[0], mx0 + mask.shape[1]
        touches = (
            (my0 == vy0 and vy0 > 0)
            or (mx0 == vx0 and vx0 > 0)
            or (my1 == vy1 and vy1 < grid.height)
            or (mx1 == vx1 and vx1 < grid.width)
        )
        centrality = min(cy - wy0, cx - wx0, wy0 + tile.window_size - cy, wx0 + tile.window_size - cx)
        oversized = max(y2 - y1, x2 - x1) > 2 * grid.halo
        row = dict(
            y0=my0, x0=mx0, cy=cy, cx=cx,
            score=detections.scores[i], iou=detections.ious[i],
            producer_row=tile.row, producer_col=tile.col, local_index=i,
            home_row=home[0], home_col=home[1], centrality=centrality,
            touches_window_edge=float(touches), oversized=float(oversized), id=0,
        )
        rows.append([row[name] for name in META_COLUMNS])
        masks.append(mask)
    meta = np.array(rows, dtype=np.float64).reshape(-1, len(META_COLUMNS))
    return CellSet(meta=meta, masks=masks)
