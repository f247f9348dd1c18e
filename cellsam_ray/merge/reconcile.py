"""Stage B: decide, for one home tile, which of the candidates homed there are kept.

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
    areas = np.array([np.count_nonzero(m) for m in pool.masks], dtype=np.int64)
    producer = pool.col("producer_row") * 1_000_003 + pool.col("producer_col")
    is_home = (pool.col("home_row") == home[0]) & (pool.col("home_col") == home[1])
    cut = pool.col("touches_window_edge") > 0

    keep = []
    suppressed = 0
    for i in np.nonzero(is_home)[0]:
        # Higher-ranked candidates of other producers whose boxes intersect this one.
        rivals = np.nonzero(
            (rank > rank[i])
            & (producer != producer[i])
            & ~(cut & cut[i])
            & (bounds[:, 0] < bounds[i, 2])
            & (bounds[:, 2] > bounds[i, 0])
            & (bounds[:, 1] < bounds[i, 3])
            & (bounds[:, 3] > bounds[i, 1])
        )[0]
        beaten = False
        for j in rivals:
            inter = overlap_pixels(bounds[i], pool.masks[i], bounds[j], pool.masks[j])
            if inter == 0:
                continue
            union = areas[i] + areas[j] - inter
            if inter / union >= iou_conflict or inter / min(areas[i], areas[j]) >= iomin_conflict:
                beaten = True
                break
        if beaten:
            suppressed += 1
        else:
            keep.append(i)
    kept = pool.subset(np.array(keep, dtype=np.int64))
    order = np.lexsort((kept.col("cx"), kept.col("cy"))) if len(kept) else np.zeros(0, np.int64)
    return kept.subset(order), suppressed


def global_offsets(counts: list[int]) -> list[int]:
    """Exclusive prefix sum of kept-cell counts in raster tile order: ids become 1..N, contiguous."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)[:-1]]).tolist() if counts else []
