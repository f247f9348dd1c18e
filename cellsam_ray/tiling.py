"""Planning tiles: cores that partition the image, windows that add a halo around each core.

A tile's *core* is a half-open rectangle; the cores of all tiles partition the image. Core sizes are
multiples of the output chunk, so each output chunk lies inside exactly one core and is written by exactly
one task. A tile's *window* is its core grown by ``halo`` on every side and is always full size
(``tile + 2 * halo``), even at image borders, where it reaches outside the image and is padded: CellSAM
stretches every window to 1024², so a clipped window would change the geometry at the borders.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from cellsam_ray.errors import UserError


@dataclass(frozen=True, order=True)
class Tile:
    """One unit of work: where its core lies and where its window lies, in level pixels."""

    row: int
    col: int
    core_y0: int
    core_x0: int
    core_y1: int
    core_x1: int
    window_y0: int  # may be negative at the image's top border
    window_x0: int
    window_size: int

    @property
    def key(self) -> str:
        """A stable name for files that hold this tile's results."""
        return f"r{self.row:05d}_c{self.col:05d}"

    @property
    def origin(self) -> tuple[int, int]:
        """The window's top-left (y, x) in level pixels."""
        return (self.window_y0, self.window_x0)

    def core_contains(self, y: float, x: float) -> bool:
        return self.core_y0 <= y < self.core_y1 and self.core_x0 <= x < self.core_x1


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one image level: ``rows × cols`` cores of ``tile`` pixels (the last ones clipped)."""

    height: int
    width: int
    tile: int
    halo: int

    @cached_property
    def rows(self) -> int:
        return -(-self.height // self.tile)

    @cached_property
    def cols(self) -> int:
        return -(-self.width // self.tile)

    @property
    def window_size(self) -> int:
        return self.tile + 2 * self.halo

    def __len__(self) -> int:
        return self.rows * self.cols

    def tile_at(self, row: int, col: int) -> Tile:
        y0, x0 = row * self.tile, col * self.tile
        return Tile(
            row=row,
            col=col,
            core_y0=y0,
            core_x0=x0,
            core_y1=min(y0 + self.tile, self.height),
            core_x1=min(x0 + self.tile, self.width),
            window_y0=y0 - self.halo,
            window_x0=x0 - self.halo,
            window_size=self.window_size,
        )

    def tiles(self) -> list[Tile]:
        """All tiles in raster order (the order global ids are assigned in)."""
        return [self.tile_at(r, c) for r in range(self.rows) for c in range(self.cols)]

    def home_of(self, y: float, x: float) -> tuple[int, int] | None:
        """The (row, col) of the tile whose core holds the point, or None outside the image."""
        if not (0 <= y < self.height and 0 <= x < self.width):
            return None
        return (int(y // self.tile), int(x // self.tile))

    def neighbourhood(self, row: int, col: int) -> list[tuple[int, int]]:
        """The 3×3 block of tiles around (row, col), clipped to the grid, in raster order."""
        return [
            (r, c)
            for r in range(max(row - 1, 0), min(row + 2, self.rows))
            for c in range(max(col - 1, 0), min(col + 2, self.cols))
        ]


def plan_grid(height: int, width: int, *, tile: int, halo: int, chunk: int, band: int) -> TileGrid:
    """Check the tiling parameters against the image and the output chunk, and return the grid.

    ``band`` is how far outside its core a tile still reports detections, for seam reconciliation; the
    merge needs every candidate that can conflict with a tile's own to come from its 3×3 neighbourhood,
    which holds when ``tile >= 2 * halo + band``.
    """
    if height <= 0 or width <= 0:
        raise UserError(f"the image level is empty ({height}×{width} pixels)")
    if chunk <= 0 or tile <= 0 or tile % chunk:
        raise UserError(f"--tile {tile} must be a positive multiple of the label chunk size {chunk}")
    if halo < 0 or band < 0:
        raise UserError(f"--halo {halo} must not be negative")
    if band > halo:
        raise UserError(f"the seam band ({band} px) must not exceed the halo ({halo} px)")
    if tile < 2 * halo + band:
        raise UserError(
            f"--tile {tile} is too small for --halo {halo}: it must be at least 2×halo + {band} "
            f"= {2 * halo + band} so that seams are reconciled between neighbouring tiles only"
        )
    return TileGrid(height=height, width=width, tile=tile, halo=halo)
