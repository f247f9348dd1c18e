"""Every cell of a label image as a polygon, for all cells at once, in NumPy: the outline tracer.

The polygon is the one marching squares draws at level 0.5 on the cell's mask (what
``skimage.measure.find_contours`` gives, with background pixels that touch at a corner connected): it
runs through the midpoints of the cell's boundary pixel edges, so a pixel's centre lies inside it
exactly when the pixel is the cell's. skimage links the contour's segments in Python, one cell at a time
(about 85 µs a cell); here every boundary edge of every cell is found at once, each edge's successor
is looked up in one sorted array, and rings are numbered and put in order by pointer jumping (a few
passes over all edges), so a tile's thousand cells cost a few milliseconds.

Edges are walked with the cell on their right (x right, y down: a lone pixel is walked east, south, west,
north); at a corner where the cell touches itself diagonally the walk turns right, keeping the two
pixels apart as marching squares does.
"""

from __future__ import annotations

import functools

import numpy as np
import shapely

from cellsam_ray.table.measure import number_ids

_STEP = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]])  # east, south, west, north, as (dy, dx)


def trace_labels(labels: np.ndarray, origin: tuple[int, int] = (0, 0),
                 offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, shapes)``: the nonzero ids of a 2-D label image, in increasing order, and each one's polygon
    (or multipolygon, for a cell in parts or with holes) in pixel coordinates (x, y), pixel (r, c) of
    ``labels`` covering [c, c+1) × [r, r+1) moved by ``origin`` (row, column), and each cell by its
    ``offsets`` row ((n, 2) as (y, x), one per id in that order) where given."""
    padded = np.pad(labels, 1)
    cell, y, x, way = _edges(padded)
    if not cell.size:
        return np.zeros(0, np.int64), np.zeros(0, object)
    ids, cell = number_ids(cell)
    successor = _successors(cell, y, x, way, padded.shape)
    ring, rank = _rings(successor)
    # Rings in cell order, each walked from its lowest edge: an edge's place is its ring's start plus the
    # steps from that ring's first edge to it.
    roots = np.flatnonzero(ring == np.arange(ring.size))
    roots = roots[np.argsort(cell[roots], kind="stable")]
    ring_length = np.bincount(ring, minlength=ring.size)  # by each ring's lowest edge
    length = ring_length[roots]
    start = np.zeros(ring.size, np.int64)
    start[roots] = np.cumsum(length) - length
    place = np.empty(ring.size, np.int64)
    place[start[ring] + ring_length[ring] - 1 - rank] = np.arange(ring.size)
    # Each edge's midpoint, less the padding, plus the origin and its cell's offset.
    points = np.stack([x + 0.5 * _STEP[way, 1] - 1 + origin[1], y + 0.5 * _STEP[way, 0] - 1 + origin[0]], axis=1)[place]
    if offsets is not None:
        points += np.asarray(offsets, dtype=np.float64)[cell[place]][:, ::-1]
    polygons = shapely.polygons(shapely.linearrings(points, indices=np.repeat(np.arange(roots.size), length)))
    first_ring = np.searchsorted(cell[roots], np.arange(ids.size))
    after = np.append(first_ring[1:], roots.size)
    shapes = np.empty(ids.size, dtype=object)
    shapes[:] = [polygons[a] if b - a == 1 else functools.reduce(shapely.symmetric_difference, polygons[a:b])
                 for a, b in zip(first_ring.tolist(), after.tolist())]
    return ids, shapes


def _successors(cell: np.ndarray, y: np.ndarray, x: np.ndarray, way: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Each edge's successor along its cell's boundary: the edge of the same cell leaving its end corner to
    the right, else straight on, else to the left. One edge leaves a corner in a given way (whichever cell
    it borders, only the one on its right walks it that way), so a table over corners and ways finds it."""
    width = shape[1] + 1
    table = np.full((shape[0] + 1) * width * 4, -1, np.int32)
    table[(y * width + x) * 4 + way] = np.arange(cell.size)
    end = ((y + _STEP[way, 0]) * width + x + _STEP[way, 1]) * 4
    successor = np.full(cell.size, -1)
    for turn in (1, 0, 3):  # right, straight on, left: never back
        candidate = table[end + (way + turn) % 4]
        found = (successor < 0) & (candidate >= 0)
        found[found] &= cell[candidate[found]] == cell[found]
        successor[found] = candidate[found]
    if (successor < 0).any():
        raise RuntimeError("a boundary edge with no successor (a bug in table.trace)")
    return successor


def _edges(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every directed boundary edge of every cell: its cell, start corner (y, x) and way (0..3, ``_STEP``),
    with the cell on its right. A corner (y, x) is the top-left corner of padded pixel (y, x)."""
    parts = []
    above, below = padded[:-1], padded[1:]
    i, c = np.nonzero(above != below)  # a horizontal edge along corner row i + 1, columns c..c+1
    parts.append((above[i, c], i + 1, c + 1, 2))  # the cell above: walked west, from its right end
    parts.append((below[i, c], i + 1, c, 0))  # the cell below: walked east
    left, right = padded[:, :-1], padded[:, 1:]
    r, j = np.nonzero(left != right)  # a vertical edge along corner column j + 1, rows r..r+1
    parts.append((left[r, j], r, j + 1, 1))  # the cell on the left: walked south
    parts.append((right[r, j], r + 1, j + 1, 3))  # the cell on the right: walked north, from its bottom
    cell = np.concatenate([p[0] for p in parts]).astype(np.int64)
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    x = np.concatenate([p[2] for p in parts]).astype(np.int64)
    way = np.concatenate([np.full(p[0].size, p[3]) for p in parts])
    keep = cell != 0
    return cell[keep], y[keep], x[keep], way[keep]


def _rings(successor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a permutation made of cycles (each edge's successor along its ring): each edge's ring (the
    lowest edge index on it) and its rank, the steps left from it to the ring's last edge (the one before
    the lowest), by pointer jumping: each pass doubles how far every edge has looked."""
    ring, jump = np.arange(successor.size), successor.copy()
    while True:
        lower = np.minimum(ring, ring[jump])
        if np.array_equal(lower, ring):
            break
        ring, jump = lower, jump[jump]
    last = successor == ring
    rank = np.where(last, 0, 1)
    nxt = np.where(last, np.arange(successor.size), successor)
    while True:
        rank, moved = rank + rank[nxt], nxt[nxt]
        if np.array_equal(moved, nxt):
            break
        nxt = moved
    return ring, rank
