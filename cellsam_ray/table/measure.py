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

    The core is read as runs (a row's stretch of one id): a cell crosses a row in one run or a few, so
    there are ~15x fewer runs than pixels, and every sum over a run's pixels has a closed form (its
    intensities come from prefix sums along the row). Integer arithmetic, so the sums are exact.
    """
    h, w = labels.shape
    oy, ox = origin
    n_channels = pixels.shape[0]
    y, x0, x1, ids = _runs(labels)
    if ids.size == 0:
        return CellSums.empty(n_channels), CellSums.empty(n_channels)
    present, k = number_ids(ids)
    record = records_of(cells, present)
    meta = cells.meta[record]
    n = present.size

    length = x1 - x0
    run_x = (x0 + x1 - 1) * length // 2  # sum of x0..x1-1
    run_xx = _sum_of_squares(x1) - _sum_of_squares(x0)
    pixel_count, sum_y, sum_yy, sum_x, sum_xx, sum_xy = (
        np.bincount(k, weights, minlength=n)
        for weights in (length, y * length, y * y * length, run_x, run_xx, y * run_x))
    # Relative to each cell's mask origin (c: the mask origin less the core's): integers, exact in float64.
    cy = meta[:, _META["y0"]] - oy
    cx = meta[:, _META["x0"]] - ox
    sums = np.zeros((n, len(SUM_COLUMNS)))
    sums[:, _S["pixels"]] = pixel_count
    sums[:, _S["sy"]] = sum_y - pixel_count * cy
    sums[:, _S["sx"]] = sum_x - pixel_count * cx
    sums[:, _S["syy"]] = sum_yy - 2 * cy * sum_y + pixel_count * cy * cy
    sums[:, _S["sxx"]] = sum_xx - 2 * cx * sum_x + pixel_count * cx * cx
    sums[:, _S["sxy"]] = sum_xy - cx * sum_y - cy * sum_x + pixel_count * cy * cx
    for name, values, ufunc, start in (("y0", y, np.minimum, h), ("x0", x0, np.minimum, w),
                                       ("y1", y + 1, np.maximum, 0), ("x1", x1, np.maximum, 0)):
        extreme = np.full(n, start, dtype=np.int64)
        ufunc.at(extreme, k, values)
        sums[:, _S[name]] = extreme + (oy if name[0] == "y" else ox)
    sums[:, _S["pieces"]] = 1
    intensity = _run_intensities(pixels, y, x0, x1, k, n)

    bounds = cells.bounds()[record]
    inside = (bounds[:, 0] >= oy) & (bounds[:, 1] >= ox) & (bounds[:, 2] <= oy + h) & (bounds[:, 3] <= ox + w)
    found = CellSums(meta, sums, intensity)
    return found.subset(inside), found.subset(~inside)


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The labelled runs of a 2-D label image: row, first column, end column (exclusive) and id of each,
    in raster order. A run starts at each row start and wherever the id changes along a row."""
    h, w = labels.shape
    flat = labels.ravel()
    starts = np.empty(flat.size, dtype=bool)
    starts[0] = True
    np.not_equal(flat[1:], flat[:-1], out=starts[1:])
    starts[::w] = True
    first = np.flatnonzero(starts)
    end = np.append(first[1:], flat.size)  # a run ends where the next one starts: never past its row
    ids = flat[first].astype(np.int64)
    labelled = ids != 0
    first, end, ids = first[labelled], end[labelled], ids[labelled]
    y = first // w
    return y, first - y * w, end - y * w, ids


def _sum_of_squares(n: np.ndarray) -> np.ndarray:
    """0² + 1² + ... + (n-1)², exactly."""
    return (n - 1) * n * (2 * n - 1) // 6


def _run_intensities(pixels: np.ndarray, y: np.ndarray, x0: np.ndarray, x1: np.ndarray, k: np.ndarray,
                     n: int) -> np.ndarray:
    """(n, C) sums of each channel over each cell's runs, from prefix sums along the rows (exact integers
    for integer pixels, see ``_prefix_dtype``; float64 for float pixels)."""
    n_channels, h, w = pixels.shape
    prefix = np.zeros((n_channels, h, w + 1), dtype=_prefix_dtype(pixels.dtype, w))
    np.cumsum(pixels, axis=-1, dtype=prefix.dtype, out=prefix[:, :, 1:])
    flat = prefix.reshape(n_channels, -1)
    row = y * (w + 1)
    per_run = flat[:, row + x1] - flat[:, row + x0]
    return np.stack([np.bincount(k, per_run[c], minlength=n) for c in range(n_channels)], axis=1)


def _prefix_dtype(dtype: np.dtype, width: int) -> np.dtype:
    """Row prefix sums stay exact in int32 while a whole row of the dtype's largest values fits (uint16
    rows up to 32k pixels: half the memory traffic of int64); other integers take int64, floats float64."""
    if dtype.kind not in "iub":
        return np.dtype(np.float64)
    info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
    fits = width * max(abs(int(info.min)), int(info.max)) < 2**31
    return np.dtype(np.int32 if fits else np.int64)


def number_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``ids``, increasing, and each of ``ids`` as an index among them, without sorting: the
    ids of one core span a few tiles' worth."""
    low = int(ids.min())
    counts = np.bincount(ids - low)
    present = np.flatnonzero(counts)
    slot = np.zeros(counts.size, dtype=np.int64)
    slot[present] = np.arange(present.size)
    return present + low, slot[ids - low]


def records_of(cells: CellSet, ids: np.ndarray) -> np.ndarray:
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
