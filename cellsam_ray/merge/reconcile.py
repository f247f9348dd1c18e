"""The reconcile stage: decide, for one home tile, which of the candidates homed there are kept.

Every candidate has a home (the tile whose core holds its box centre) and a producer (the tile that
detected it). Near a seam, two producers may both report a cell, or each may place its centre in the
other's core. The home tile's task decides for every candidate homed at it, so each is decided once:
it is kept unless a candidate from a *different* producer overlaps it (IoU or intersection-over-minimum
above the thresholds) and ranks higher (``CellSet.rank_order``). Overlaps between one producer's own
masks are not conflicts: they were one model's answer on one window, settled when painting. Nor are
overlaps between two copies that were *both* cut by their windows' edges: those are pieces of a cell
larger than the halo allows, and dropping either would lose pixels, so both are kept (the cell then
carries two ids) and the pieces are counted as oversized in the report.

Only the 3×3 neighbourhood of tiles can produce candidates that conflict with a home tile's cells
(``plan_grid`` enforces tile >= 2·halo + band for that), so the decision needs no global view.
"""

from __future__ import annotations

import numpy as np

from cellsam_ray.merge.objects import CellSet

IOU_CONFLICT = 0.3
IOMIN_CONFLICT = 0.5


def overlap_pixels(a_bounds: np.ndarray, a_mask: np.ndarray, b_bounds: np.ndarray, b_mask: np.ndarray) -> int:
    y0, x0 = max(a_bounds[0], b_bounds[0]), max(a_bounds[1], b_bounds[1])
    y1, x1 = min(a_bounds[2], b_bounds[2]), min(a_bounds[3], b_bounds[3])
    if y1 <= y0 or x1 <= x0:
        return 0
    a = a_mask[y0 - a_bounds[0] : y1 - a_bounds[0], x0 - a_bounds[1] : x1 - a_bounds[1]]
    b = b_mask[y0 - b_bounds[0] : y1 - b_bounds[0], x0 - b_bounds[1] : x1 - b_bounds[1]]
    return int(np.count_nonzero(a & b))


def reconcile_home(
    home: tuple[int, int],
    neighbourhood: list[CellSet],
    *,
    iou_conflict: float = IOU_CONFLICT,
    iomin_conflict: float = IOMIN_CONFLICT,
) -> tuple[CellSet, int]:
    """Kept cells homed at ``home``, sorted by centre (y, x), and how many conflicts removed a copy.

    ``neighbourhood`` holds the candidates of the producers in the 3×3 block around ``home``.
    """
    pool = CellSet.concat(neighbourhood)
    if not len(pool):
        return CellSet(), 0
    rank = np.empty(len(pool), dtype=np.int64)
    rank[pool.rank_order()] = np.arange(len(pool))
    bounds = pool.bounds()
    producer = pool.col("producer_row") * 1_000_003 + pool.col("producer_col")
    cut = pool.col("touches_window_edge") > 0
    mine = np.nonzero((pool.col("home_row") == home[0]) & (pool.col("home_col") == home[1]))[0]

    beaten = np.zeros(len(pool), dtype=bool)
    areas: dict[int, int] = {}

    def area(i: int) -> int:
        if i not in areas:
            areas[i] = int(np.count_nonzero(pool.masks[i]))
        return areas[i]

    for i, j in _rival_pairs(mine, bounds, rank, producer, cut):
        if beaten[i]:
            continue
        inter = overlap_pixels(bounds[i], pool.masks[i], bounds[j], pool.masks[j])
        if inter == 0:
            continue
        union = area(i) + area(j) - inter
        if inter / union >= iou_conflict or inter / min(area(i), area(j)) >= iomin_conflict:
            beaten[i] = True
    keep = mine[~beaten[mine]]
    kept = pool.subset(keep)
    order = np.lexsort((kept.col("cx"), kept.col("cy"))) if len(kept) else np.zeros(0, np.int64)
    return kept.subset(order), int(beaten[mine].sum())


def _rival_pairs(mine: np.ndarray, bounds: np.ndarray, rank: np.ndarray, producer: np.ndarray,
                 cut: np.ndarray, block: int = 512) -> list[tuple[int, int]]:
    """Pairs (i, j): ``i`` homed here, ``j`` a higher-ranked candidate of another producer whose box
    intersects i's (and not both cut by their windows): the candidates a conflict can come from.
    Found by comparing boxes in blocks, one producer of home cells at a time against the other producers'
    candidates near them (most home cells come from the home tile, whose rivals are the few seam cells of
    its neighbours), so only the few pairs near seams reach the pixel test."""
    pairs: list[tuple[int, int]] = []
    for source in np.unique(producer[mine]):
        ours = mine[producer[mine] == source]
        ob = bounds[ours]
        near = np.nonzero((producer != source) & (bounds[:, 0] < ob[:, 2].max()) & (bounds[:, 2] > ob[:, 0].min())
                          & (bounds[:, 1] < ob[:, 3].max()) & (bounds[:, 3] > ob[:, 1].min()))[0]
        if not near.size:
            continue
        nb, nr, nc = bounds[near], rank[near], cut[near]
        for start in range(0, ours.size, block):
            ii = ours[start : start + block]
            b = bounds[ii]
            hit = ((nb[None, :, 0] < b[:, None, 2]) & (nb[None, :, 2] > b[:, None, 0])
                   & (nb[None, :, 1] < b[:, None, 3]) & (nb[None, :, 3] > b[:, None, 1])
                   & (nr[None, :] > rank[ii][:, None]) & ~(nc[None, :] & cut[ii][:, None]))
            a, c = np.nonzero(hit)  # a candidate is beaten by any conflicting rival: their order does not matter
            pairs += list(zip(ii[a].tolist(), near[c].tolist()))
    return pairs


def global_offsets(counts: list[int]) -> list[int]:
    """Exclusive prefix sum of kept-cell counts in raster tile order: ids become 1..N, contiguous."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)[:-1]]).tolist() if counts else []
