"""The segment stage's output: turn one window's detections into candidates in level pixels.

A tile keeps the detections whose box centre lies in its core (it owns them) or within ``band`` pixels
outside it (band copies, used only to reconcile seams); the rest of its halo belongs to its neighbours.
Masks are clipped to the image and to the window, and a mask cut by the window's edge is flagged: for
such a cell the tile did not see the whole object.
"""

from __future__ import annotations

import numpy as np

from cellsam_ray.merge.objects import META_COLUMNS, CellSet, PackedMasks
from cellsam_ray.segmenter import Detections
from cellsam_ray.tiling import Tile, TileGrid


def tile_candidates(detections: Detections, tile: Tile, grid: TileGrid, band: int) -> CellSet:
    """The window's detections this tile keeps, as candidates: the geometry of every box at once, then the
    kept masks cut to the image and the window, and all together to their own extent (``_trimmed``)."""
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
    owned = np.flatnonzero(owned)
    # Each kept mask cut to the view: where its clipped box lies within the box rounded outward.
    view = zip(owned.tolist(), (cy0 - gy0)[owned].tolist(), (cx0 - gx0)[owned].tolist(),
               (cy1 - gy0)[owned].tolist(), (cx1 - gx0)[owned].tolist())
    crops = [detections.masks[i][t:b, l:r] for i, t, l, b, r in view]
    index, (top, left, bottom, right), packed = _trimmed(crops, owned)
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
    return CellSet(meta=meta, masks=packed)


def _trimmed(crops: list[np.ndarray], index: np.ndarray) -> tuple[np.ndarray, tuple, PackedMasks]:
    """The non-empty ``crops`` cut to their own extent (so a stored record is small and its bounds exact),
    with a few NumPy calls over all crops rather than several per cell: which rows and which columns of
    each crop hold a pixel come from one segmented ``or`` over the crops' rows and one over their
    columns, and each crop's extent from those. Returns the indices (from ``index``) of the non-empty
    crops, their extents within the crop (top, left, bottom, right) and their masks, packed."""
    if not crops:
        empty = np.zeros(0, np.int64)
        return empty, (empty, empty, empty, empty), PackedMasks.of_buffer(np.zeros(0, bool), np.zeros((0, 2), np.int64))
    heights = np.array([c.shape[0] for c in crops], np.int64)
    widths = np.array([c.shape[1] for c in crops], np.int64)
    top, bottom = _first_and_end(np.concatenate([c.ravel() for c in crops]), heights, widths)
    left, right = _first_and_end(np.concatenate([c.T.ravel() for c in crops]), widths, heights)
    keep = np.flatnonzero(bottom > 0)
    extents = top[keep], left[keep], bottom[keep], right[keep]
    bounds = np.stack(extents, axis=1).tolist()
    flat = np.concatenate([crops[k][t:b, l:r].ravel() for k, (t, l, b, r) in zip(keep.tolist(), bounds)]) \
        if keep.size else np.zeros(0, bool)
    shapes = np.stack([extents[2] - extents[0], extents[3] - extents[1]], axis=1).reshape(-1, 2)
    return index[keep], extents, PackedMasks.of_buffer(flat, shapes)


def _first_and_end(flat: np.ndarray, lines: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For crops laid out one after another in ``flat`` as ``lines[i]`` lines of ``length[i]`` pixels
    each, the first line holding a pixel and one past the last (0 and 0 for an empty crop)."""
    crop = np.repeat(np.arange(len(lines)), lines)  # each line's crop
    place = np.arange(crop.size) - (np.cumsum(lines) - lines)[crop]  # its place in the crop
    line_length = length[crop]
    line_starts = (np.cumsum(lines * length) - lines * length)[crop] + place * line_length
    real = np.flatnonzero(line_length > 0)  # reduceat would give a zero-length line the next one's pixel
    hit = np.zeros(crop.size, bool)
    if real.size:
        hit[real] = np.logical_or.reduceat(flat, line_starts[real])
    crops_hit, places_hit = crop[hit], place[hit]  # crop by crop, line by line
    starts = np.flatnonzero(np.diff(crops_hit, prepend=-1))
    last = np.append(starts[1:], crops_hit.size)[: starts.size] - 1
    first = np.zeros(len(lines), np.int64)
    end = np.zeros(len(lines), np.int64)
    first[crops_hit[starts]] = places_hit[starts]
    end[crops_hit[last]] = places_hit[last] + 1
    return first, end
