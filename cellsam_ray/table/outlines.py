"""Cell outlines: each cell's painted pixels as a polygon, made once, where the cell is whole.

Outlines come from the painted cores, as the table's sums do, so an outline is the label image's cell
(overlaps already settled by the paint order), not the model's raw mask. A cell inside one core is outlined
by the paint task that painted it (``outline_core``); a cell that crosses a seam leaves one piece (its
pixels in that core) with every core it reaches, and its home's row task pastes the pieces together and
outlines the whole cell once (``home_outlines``). Every piece of a cell homed at a tile lies in that tile's
3×3 neighbourhood, as for the table.

A mask becomes a polygon by marching squares at level 0.5 (``skimage.measure.find_contours``): the
contour runs half-way between each cell pixel's centre and its neighbours', so a pixel's centre lies inside
the polygon exactly when the pixel is the cell's. Coordinates are those of QuPath and GeoJSON users: x
right, y down, pixel (r, c) covering [c, c+1) × [r, r+1) of level 0. Holes and parts (a cell cut in two
by a higher-ranked neighbour) are kept: the rings are combined even-odd (symmetric difference).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import shapely
from scipy import ndimage
from skimage.measure import find_contours

from cellsam_ray.merge.objects import CellSet, PackedMasks


@dataclass
class CoreOutlines:
    """What one painted core gives the outlines: the whole outlines of the cells inside it (``ids``,
    ``shapes``: shapely geometries in level pixels, id order) and the pieces of the cells that cross its
    edge (``piece_ids``, the home tile of each, the top-left of each piece in level pixels, the masks)."""

    ids: np.ndarray
    shapes: np.ndarray
    piece_ids: np.ndarray
    piece_homes: np.ndarray
    piece_origins: np.ndarray
    pieces: PackedMasks

    @staticmethod
    def empty() -> "CoreOutlines":
        none = np.zeros(0, np.int64)
        return CoreOutlines(none, np.zeros(0, object), none, np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64),
                            PackedMasks.of_buffer(np.zeros(0, bool), np.zeros((0, 2), np.int64)))


def outline_core(labels: np.ndarray, origin: tuple[int, int], cells: CellSet) -> CoreOutlines:
    """The outlines of the cells painted in one core (``labels``, top-left ``origin`` in level pixels),
    and the pieces of those that reach beyond it. ``cells`` are the numbered cells painted there: a cell
    whose kept mask lies inside the core is whole here (the same rule as the table's ``measure_core``)."""
    painted = labels != 0
    if not painted.any():
        return CoreOutlines.empty()
    oy, ox = origin
    low = int(labels[painted].min())
    shifted = np.where(painted, labels.astype(np.int64) - low + 1, 0)
    slices = ndimage.find_objects(shifted)
    ids = np.array([i + low for i, s in enumerate(slices) if s is not None], dtype=np.int64)
    boxes = [s for s in slices if s is not None]
    carried = cells.col("id").astype(np.int64)
    record = {cell: i for i, cell in enumerate(carried.tolist())}
    bounds = cells.bounds()
    home_rows, home_cols = cells.col("home_row"), cells.col("home_col")
    h, w = labels.shape
    whole, shapes, piece_ids, piece_homes, piece_origins, piece_masks = [], [], [], [], [], []
    for cell, (rows, cols) in zip(ids.tolist(), boxes):
        mask = labels[rows, cols] == cell
        i = record[cell]
        y0, x0, y1, x1 = bounds[i].tolist()
        if y0 >= oy and x0 >= ox and y1 <= oy + h and x1 <= ox + w:
            whole.append(cell)
            shapes.append(mask_outline(mask, (oy + rows.start, ox + cols.start)))
        else:
            piece_ids.append(cell)
            piece_homes.append((int(home_rows[i]), int(home_cols[i])))
            piece_origins.append((oy + rows.start, ox + cols.start))
            piece_masks.append(mask)
    shapes_of_pieces = np.array([m.shape for m in piece_masks], np.int64).reshape(-1, 2)
    flat = np.concatenate([m.ravel() for m in piece_masks]) if piece_masks else np.zeros(0, bool)
    return CoreOutlines(np.array(whole, np.int64), _objects(shapes), np.array(piece_ids, np.int64),
                        np.array(piece_homes, np.int64).reshape(-1, 2),
                        np.array(piece_origins, np.int64).reshape(-1, 2), PackedMasks.of_buffer(flat, shapes_of_pieces))


def home_outlines(home: tuple[int, int], own: CoreOutlines, near: list[CoreOutlines]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, shapes)`` of the cells homed at ``home``, in id order: the whole ones its own core
    outlined, and those whose pieces the cores ``near`` it (its 3×3 neighbourhood, itself included)
    hold, each pasted together and outlined once."""
    ids, shapes = [own.ids], [own.shapes]
    by_cell: dict[int, list[tuple[tuple[int, int], np.ndarray]]] = {}
    for core in near:
        mine = np.flatnonzero((core.piece_homes[:, 0] == home[0]) & (core.piece_homes[:, 1] == home[1]))
        for i in mine.tolist():
            by_cell.setdefault(int(core.piece_ids[i]), []).append((tuple(core.piece_origins[i].tolist()), core.pieces[i]))
    joined = sorted(by_cell)
    ids.append(np.array(joined, np.int64))
    shapes.append(_objects([_pasted_outline(by_cell[cell]) for cell in joined]))
    ids, shapes = np.concatenate(ids), np.concatenate(shapes)
    order = np.argsort(ids, kind="stable")
    return ids[order], shapes[order]


def _pasted_outline(pieces: list[tuple[tuple[int, int], np.ndarray]]) -> shapely.Geometry:
    """The outline of a cell from its pieces (top-left, mask) in several cores."""
    y0 = min(o[0] for o, _ in pieces)
    x0 = min(o[1] for o, _ in pieces)
    y1 = max(o[0] + m.shape[0] for o, m in pieces)
    x1 = max(o[1] + m.shape[1] for o, m in pieces)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for (oy, ox), piece in pieces:
        mask[oy - y0 : oy - y0 + piece.shape[0], ox - x0 : ox - x0 + piece.shape[1]] |= piece
    return mask_outline(mask, (y0, x0))


def mask_outline(mask: np.ndarray, origin: tuple[int, int]) -> shapely.Geometry:
    """The polygon (or multipolygon) whose inside holds exactly the centres of ``mask``'s pixels, in level
    pixel coordinates (x, y) with ``mask[0, 0]`` at ``origin`` (row, column)."""
    # Padded, so every contour closes; a padded index i is pixel i - 1, whose centre is at i - 1 + 0.5.
    contours = find_contours(np.pad(mask, 1).astype(np.uint8), 0.5)
    shift = np.array([origin[1] - 0.5, origin[0] - 0.5])
    rings = [shapely.Polygon(c[:, ::-1] + shift) for c in contours if len(c) >= 4]
    if len(rings) == 1:
        return rings[0]
    return functools.reduce(shapely.symmetric_difference, rings)


def _objects(items: list) -> np.ndarray:
    """A 1-D object array of ``items`` (numpy would otherwise try to see inside the geometries)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out
