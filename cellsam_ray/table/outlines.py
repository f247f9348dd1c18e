"""Cell outlines: each cell's painted pixels as a polygon, made once, where the cell is whole.

Outlines come from the painted cores, as the table's sums do, so an outline is the label image's cell
(overlaps already settled by the paint order), not the model's raw mask. A cell inside one core is outlined
by the paint task that painted it (``outline_core``); a cell that crosses a seam leaves one piece (its
pixels in that core) with every core it reaches, and its home's row task pastes the pieces together and
outlines the whole cell once (``home_outlines``). Every piece of a cell homed at a tile lies in that tile's
3×3 neighbourhood, as for the table.

The polygons are ``trace``'s: marching squares' contour through the midpoints of the cell's boundary
pixel edges, so a pixel's centre lies inside exactly when the pixel is the cell's. Coordinates are those of
QuPath and GeoJSON users: x right, y down, pixel (r, c) covering [c, c+1) × [r, r+1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

from cellsam_ray.merge.objects import CellSet, PackedMasks
from cellsam_ray.table.measure import records_of
from cellsam_ray.table.trace import trace_labels

SIMPLIFY_PX = 0.4
"""Douglas-Peucker tolerance, in pixels of the segmented level. The traced polygon has a vertex per
boundary pixel edge; at 0.4 px the 514 cells of a synthetic slide keep 24 of their 92 vertices on average
and, rasterised back, cover their pixels with IoU ≥ 0.95 (mean 0.998). At 0.5 a straight edge may move
half a pixel, onto the pixel centres of its last column, and thin cells lose that column (IoU down to
0.52): notes/pipeline.md, "Outlines"."""


@dataclass
class CoreOutlines:
    """What one painted core gives the outlines: the whole outlines of the cells inside it (``ids``, and
    ``wkb``: simplified, in level pixels, id order; WKB travels between processes ten times faster than
    pickled geometries) and the pieces of the cells that cross its edge (``piece_ids``, the home tile of
    each, the top-left of each piece in level pixels, the masks)."""

    ids: np.ndarray
    wkb: np.ndarray
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
    if not labels.any():
        return CoreOutlines.empty()
    ids, shapes = trace_labels(labels, origin)
    oy, ox = origin
    h, w = labels.shape
    record = records_of(cells, ids)
    mask_y0, mask_x0, mask_y1, mask_x1 = cells.bounds()[record].T
    whole = (mask_y0 >= oy) & (mask_x0 >= ox) & (mask_y1 <= oy + h) & (mask_x1 <= ox + w)
    cut = np.flatnonzero(~whole)
    # A traced outline's bounds are its cell's pixel box (the contour runs through the edges' midpoints).
    boxes = (shapely.bounds(shapes[cut]).astype(np.int64) - [ox, oy, ox, oy]).tolist()  # x0, y0, x1, y1 in the core
    piece_origins = [(oy + top, ox + left) for left, top, _, _ in boxes]
    piece_masks = [labels[top:bottom, left:right] == cell
                   for cell, (left, top, right, bottom) in zip(ids[cut].tolist(), boxes)]
    homes = np.stack([cells.col("home_row"), cells.col("home_col")], axis=1).astype(np.int64)[record[cut]]
    sizes = np.array([m.shape for m in piece_masks], np.int64).reshape(-1, 2)
    flat = np.concatenate([m.ravel() for m in piece_masks]) if piece_masks else np.zeros(0, bool)
    return CoreOutlines(ids[whole], shapely.to_wkb(simplified(shapes[whole])), ids[cut], homes.reshape(-1, 2),
                        np.array(piece_origins, np.int64).reshape(-1, 2), PackedMasks.of_buffer(flat, sizes))


def home_outlines(home: tuple[int, int], own: CoreOutlines, near: list[CoreOutlines]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, shapes)`` of the cells homed at ``home``, in id order, simplified: the whole ones its own
    core outlined, and those whose pieces the cores ``near`` it (its 3×3 neighbourhood, itself included)
    hold, each pasted together and outlined once."""
    by_cell: dict[int, list[tuple[tuple[int, int], np.ndarray]]] = {}
    for core in near:
        mine = np.flatnonzero((core.piece_homes[:, 0] == home[0]) & (core.piece_homes[:, 1] == home[1]))
        for i in mine.tolist():
            by_cell.setdefault(int(core.piece_ids[i]), []).append((tuple(core.piece_origins[i].tolist()), core.pieces[i]))
    joined = np.array(sorted(by_cell), np.int64)
    shapes = simplified(_pasted_outlines([by_cell[cell] for cell in joined.tolist()]))
    ids, shapes = np.concatenate([own.ids, joined]), np.concatenate([shapely.from_wkb(own.wkb), shapes])
    order = np.argsort(ids, kind="stable")
    return ids[order], shapes[order]


def _pasted_outlines(cells: list[list[tuple[tuple[int, int], np.ndarray]]]) -> np.ndarray:
    """The outlines of cells given as pieces (top-left, mask) from several cores: each cell's pieces pasted
    side by side with the others' into one label image (cell k labelled k + 1), traced at once, and moved
    back to where the cell lies."""
    if not cells:
        return np.zeros(0, object)
    boxes = []
    for pieces in cells:
        y0 = min(o[0] for o, _ in pieces)
        x0 = min(o[1] for o, _ in pieces)
        boxes.append((y0, x0, max(o[0] + m.shape[0] for o, m in pieces), max(o[1] + m.shape[1] for o, m in pieces)))
    widths = [x1 - x0 for _, x0, _, x1 in boxes]
    left = np.cumsum([0] + widths[:-1])
    canvas = np.zeros((max(y1 - y0 for y0, _, y1, _ in boxes), sum(widths)), np.int32)
    for k, (pieces, (y0, x0, _, _), at) in enumerate(zip(cells, boxes, left.tolist())):
        for (oy, ox), piece in pieces:
            view = canvas[oy - y0 : oy - y0 + piece.shape[0], at + ox - x0 : at + ox - x0 + piece.shape[1]]
            view[piece] = k + 1
    offsets = np.array([(y0, x0 - at) for (y0, x0, _, _), at in zip(boxes, left.tolist())])
    ids, shapes = trace_labels(canvas, offsets=offsets)
    if ids.size != len(cells):
        raise RuntimeError("a seam cell without pixels (a bug in table.outlines)")
    return shapes


def simplified(shapes: np.ndarray) -> np.ndarray:
    """``shapes`` simplified by ``SIMPLIFY_PX``: plain Douglas-Peucker (ten times faster than GEOS's
    topology-preserving simplifier), and the topology-preserving one for the few it leaves invalid or
    empty."""
    simple = shapely.simplify(shapes, SIMPLIFY_PX, preserve_topology=False)
    broken = ~shapely.is_valid(simple) | shapely.is_empty(simple)
    if broken.any():
        simple[broken] = shapely.simplify(shapes[broken], SIMPLIFY_PX, preserve_topology=True)
    return simple
