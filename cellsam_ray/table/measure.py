"""Per-cell sums over one tile core's painted labels and image pixels: the table's only pass over pixels.

Everything measured is a sum (pixel count, coordinate moments, intensity per channel) or an extreme
(bounding box), so the pieces of a cell that crosses a seam, measured by different core tasks, combine
exactly by adding them (``combine``). Coordinates are summed relative to the cell's mask origin, which
every core sees the same, so the sums are small integers (exact in float64) and the second moments lose
no precision to a large offset. Medians are not here: they need all of a cell's pixels in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellsam_ray.merge.objects import META_COLUMNS, CellSet

# Columns of ``CellSums.sums``: pixel count, coordinate sums relative to the mask origin (y0, x0 of the
# cell's record), the half-open bounding box in level pixels, and how many cores held a piece.
SUM_COLUMNS = ("pixels", "sy", "sx", "syy", "sxx", "sxy", "y0", "x0", "y1", "x1", "pieces")
_S = {name: i for i, name in enumerate(SUM_COLUMNS)}
_ADDED = [_S[n] for n in ("pixels", "sy", "sx", "syy", "sxx", "sxy", "pieces")]
_META = {name: i for i, name in enumerate(META_COLUMNS)}


@dataclass
class CellSums:
    """Sums over cells' pixels: one row per cell, or per piece of a cell before ``combine``.

    ``meta`` rows are the cells' ``CellSet`` records (id, mask origin, scores, producer, home, flags),
    ``sums`` follows ``SUM_COLUMNS``, ``intensity`` holds the raw intensity sums, one column per channel.
    """

    meta: np.ndarray
    sums: np.ndarray
    intensity: np.ndarray

    @staticmethod
    def empty(n_channels: int) -> "CellSums":
        return CellSums(np.zeros((0, len(META_COLUMNS))), np.zeros((0, len(SUM_COLUMNS))),
                        np.zeros((0, n_channels)))

    def __len__(self) -> int:
        return len(self.meta)

    def col(self, name: str) -> np.ndarray:
        return self.sums[:, _S[name]]

    def meta_col(self, name: str) -> np.ndarray:
        return self.meta[:, _META[name]]

    def subset(self, index: np.ndarray) -> "CellSums":
        return CellSums(self.meta[index], self.sums[index], self.intensity[index])

    @staticmethod
    def concat(parts: list["CellSums"]) -> "CellSums":
        return CellSums(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("meta", "sums", "intensity")))


def measure_core(
    labels: np.ndarray, origin: tuple[int, int], pixels: np.ndarray, cells: CellSet
) -> tuple[CellSums, CellSums]:
    """Sums of every cell painted in one core: ``(complete, partial)``.

    ``labels`` is the core's painted ids, ``origin`` its top-left in level pixels, ``pixels`` the image's
    raw channels over the core (C, h, w), and ``cells`` the numbered kept cells that were painted (every
    id in ``labels`` must be among them). A cell's pixels all lie in its mask, so a cell whose mask lies
    inside the core is ``complete`` here; the others are ``partial``: one piece each, to be combined with
    the pieces other cores hold.
    """
    h, w = labels.shape
    oy, ox = origin
    n_channels = pixels.shape[0]
    where = np.flatnonzero(labels)
    if where.size == 0:
        return CellSums.empty(n_channels), CellSums.empty(n_channels)
    ids = labels.ravel()[where].astype(np.int64)
    # Number the ids present 0..K-1 without sorting the pixels: ids in a core span a few tiles' worth.
    low = int(ids.min())
    counts = np.bincount(ids - low)
    present = np.flatnonzero(counts)
    slot = np.zeros(counts.size, dtype=np.int64)
    slot[present] = np.arange(present.size)
    k = slot[ids - low]
    record = _records_of(cells, present + low)
    meta = cells.meta[record]

    ys, xs = np.divmod(where, w)
    dy = (ys + oy - meta[:, _META["y0"]][k]).astype(np.float64)
    dx = (xs + ox - meta[:, _META["x0"]][k]).astype(np.float64)
    n = present.size
    sums = np.zeros((n, len(SUM_COLUMNS)))
    sums[:, _S["pixels"]] = counts[present]
    for name, weights in (("sy", dy), ("sx", dx), ("syy", dy * dy), ("sxx", dx * dx), ("sxy", dy * dx)):
        sums[:, _S[name]] = np.bincount(k, weights, minlength=n)
    for name, values, ufunc, start in (("y0", ys + oy, np.minimum, oy + h), ("x0", xs + ox, np.minimum, ox + w),
                                       ("y1", ys + oy + 1, np.maximum, oy), ("x1", xs + ox + 1, np.maximum, ox)):
        extreme = np.full(n, start, dtype=np.int64)
        ufunc.at(extreme, k, values)
        sums[:, _S[name]] = extreme
    sums[:, _S["pieces"]] = 1
    flat = pixels.reshape(n_channels, -1)
    intensity = np.stack([np.bincount(k, flat[c, where], minlength=n) for c in range(n_channels)], axis=1)

    bounds = cells.bounds()[record]
    inside = (bounds[:, 0] >= oy) & (bounds[:, 1] >= ox) & (bounds[:, 2] <= oy + h) & (bounds[:, 3] <= ox + w)
    found = CellSums(meta, sums, intensity)
    return found.subset(inside), found.subset(~inside)


def _records_of(cells: CellSet, ids: np.ndarray) -> np.ndarray:
    """Indices into ``cells`` of the records carrying ``ids``."""
    carried = cells.col("id").astype(np.int64) if len(cells) else np.zeros(0, np.int64)
    order = np.argsort(carried, kind="stable")
    at = np.searchsorted(carried[order], ids)
    if np.any(at >= len(order)) or not np.array_equal(carried[order[at]], ids):
        raise ValueError("the painted labels hold ids that none of the given cells carries")
    return order[at]


def combine(pieces: CellSums) -> CellSums:
    """One row per cell id, in id order: sums added, bounding boxes joined, records kept."""
    if not len(pieces):
        return pieces
    order = np.argsort(pieces.meta_col("id"), kind="stable")
    pieces = pieces.subset(order)
    ids = pieces.meta_col("id")
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    sums = np.empty((starts.size, len(SUM_COLUMNS)))
    sums[:, _ADDED] = np.add.reduceat(pieces.sums[:, _ADDED], starts, axis=0)
    for name, ufunc in (("y0", np.minimum), ("x0", np.minimum), ("y1", np.maximum), ("x1", np.maximum)):
        sums[:, _S[name]] = ufunc.reduceat(pieces.col(name), starts)
    return CellSums(pieces.meta[starts], sums, np.add.reduceat(pieces.intensity, starts, axis=0))
