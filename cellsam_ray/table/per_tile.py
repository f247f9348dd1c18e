"""The cell table's steps as plain functions on plain records; ``execution`` schedules them.

1. ``measure_tile``, in the paint stage right after a core is painted: the sums of every cell painted
   there, from the painted ids and the image's channels over the core (no label is read back from storage).
2. ``home_rows``, once per home tile after the paint stage: the cells it numbered, their seam pieces combined,
   as typed rows. Every core that painted a piece of such a cell lies in the tile's 3×3 neighbourhood
   (a core paints only the kept cells of its own 3×3 neighbourhood), so the pieces are all there.
3. ``write.ParquetStream`` appends each tile's rows in raster order, which is id order.

With outlines on, the same two steps outline the cells (``outlines``): whole cells in the paint task,
seam cells from their pieces in the home's row task, encoded there (``geo.encode``) beside the rows.

Memory per task is one core of every channel (C × tile² raw pixels) plus a few float64 arrays of the
core's labelled pixels, whatever the slide's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cellsam_ray.io.ngff import open_image
from cellsam_ray.merge.objects import CellSet
from cellsam_ray.pipeline import source
from cellsam_ray.pipeline.pixels import read_channels
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.table.columns import cell_columns
from cellsam_ray.table.geo import GeoBlock, OutlineLayout, encode
from cellsam_ray.table.measure import CellSums, combine, measure_core
from cellsam_ray.table.outlines import CoreOutlines, home_outlines, outline_core
from cellsam_ray.table.schema import TableLayout, channel_columns
from cellsam_ray.tiling import Tile


@dataclass
class CoreCells:
    """What one painted core hands the rows of the homes around it: the sums of the cells wholly inside
    it (``complete``) and of the pieces of those crossing its edge (``partial``), and with outlines on,
    their outlines and pieces."""

    complete: CellSums
    partial: CellSums
    outlines: CoreOutlines | None


def layouts(plan: SlidePlan) -> tuple[TableLayout, OutlineLayout | None]:
    """The slide's table columns and the segmented level's geometry, and with outlines on, how that level's
    pixels map to level 0's and level 0's physical transform: from the image's metadata, read once."""
    image = open_image(plan.spec.input, plan.spec.storage.options())
    first, level = image.levels[0], image.levels[plan.level]
    y, x = plan.axes.index("y"), plan.axes.index("x")
    names = tuple(image.channel_names)
    n = plan.image_channels
    unit = image.axis_units[x] or ""
    table = TableLayout(
        channels=channel_columns(names, n),
        channel_names=tuple(names[i] if i < len(names) else "" for i in range(n)),
        level=plan.level,
        scale=(level.scale[y], level.scale[x]),
        translation=(level.translation[y], level.translation[x]),
        unit=unit,
    )
    if not plan.spec.outlines:
        return table, None
    return table, OutlineLayout(downsample=(level.scale[y] / first.scale[y], level.scale[x] / first.scale[x]),
                                scale=(first.scale[y], first.scale[x]),
                                translation=(first.translation[y], first.translation[x]), unit=unit)


def core_cells(plan: SlidePlan, tile: Tile, labels: np.ndarray, cells: CellSet) -> CoreCells:
    """The sums, and the outlines when the spec asks for them, of the cells painted in ``tile``'s core."""
    complete, partial = measure_tile(plan, tile, labels, cells)
    outlines = outline_core(labels, (tile.core_y0, tile.core_x0), cells) if plan.spec.outlines else None
    return CoreCells(complete, partial, outlines)


def measure_tile(plan: SlidePlan, tile: Tile, labels: np.ndarray, cells: CellSet) -> tuple[CellSums, CellSums]:
    """``(complete, partial)`` sums of the cells painted in ``tile``'s core (see ``measure_core``)."""
    n_channels = plan.image_channels
    if not labels.any():
        return CellSums.empty(n_channels), CellSums.empty(n_channels)
    pixels = read_channels(source.level_array(plan), plan.axes, plan.plane, range(n_channels),
                           slice(tile.core_y0, tile.core_y1), slice(tile.core_x0, tile.core_x1))
    return measure_core(labels, (tile.core_y0, tile.core_x0), pixels, cells)


def rows_of_homes(layout: TableLayout, outlines: OutlineLayout | None, homes: list[tuple[int, int]],
                  near: list[list[tuple[int, int]]], cores: dict[tuple[int, int], CoreCells]
                  ) -> tuple[pa.Table, GeoBlock | None]:
    """The rows of several homes (in raster order) as one table, and with ``outlines`` their outlines:
    ``near`` holds each home's painted neighbouring cores (itself among them), ``cores`` what each gave."""
    tables, shapes = [], []
    for home, around in zip(homes, near):
        rows = home_rows(layout, home, cores[home].complete, [cores[rc].partial for rc in around])
        tables.append(rows)
        if outlines is not None:
            ids, found = home_outlines(home, cores[home].outlines, [cores[rc].outlines for rc in around])
            if not np.array_equal(ids, rows.column("id").to_numpy().astype(np.int64)):
                raise RuntimeError(f"tile {home}: the outlined cells are not the table's (a bug in table.outlines)")
            shapes.append(found)
    rows = pa.concat_tables(tables)
    return rows, (encode(rows, np.concatenate(shapes), outlines) if outlines is not None else None)


def home_rows(layout: TableLayout, home: tuple[int, int], complete: CellSums, partials: list[CellSums]) -> pa.Table:
    """The rows of the cells numbered by ``home``, in id order.

    ``complete`` are the cells wholly inside ``home``'s core; ``partials`` the seam pieces measured by the
    cores of its 3×3 neighbourhood, of which only those of cells homed at ``home`` are taken.
    """
    pieces = CellSums.concat(list(partials))
    mine = (pieces.meta_col("home_row") == home[0]) & (pieces.meta_col("home_col") == home[1])
    cells = combine(CellSums.concat([complete, pieces.subset(mine)]))
    return pa.Table.from_pydict(cell_columns(cells, layout), schema=layout.arrow_schema())
