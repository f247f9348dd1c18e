"""Which QC pictures a run gets, read from the slide and its new labels, and written to ``labels/<name>/qc/``.

- ``overview.png``: the whole slide at the finest pyramid level that fits ``OVERVIEW_SIZE`` (the label
  pyramid has the same levels, so the outlines come from the matching label level);
- ``tile_<key>.png``: the cores of the ``TILE_CROPS`` tiles with the most cells, at the segmented level;
- ``seam_y<Y>_x<X>.png``: ``SEAM_CROPS`` crops centred on the tile corners around which most seam copies
  were reconciled, with the seams dashed and the cells that cross them tinted (both in ``render.SEAM``):
  a cell cut by the merge would show as two outlines meeting on a dashed line.

Channels are stretched by the same percentiles in every picture (taken from the overview's pixels), so
crops and overview compare. Memory is one overview (``OVERVIEW_SIZE``² × shown channels) at most.
"""

from __future__ import annotations

import math

import numpy as np

from cellsam_ray.io.ngff import open_image
from cellsam_ray.pipeline import labels_out
from cellsam_ray.pipeline.intensity import ChannelScale, channel_scales
from cellsam_ray.pipeline.pixels import read_channels
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.qc import render
from cellsam_ray.tiling import TileGrid

OVERVIEW_SIZE = 1024  # longest side of the overview, pixels
SHOWN_CHANNELS = len(render.PALETTE)  # segmentation channels first, then the others in order
TILE_CROPS = 2
SEAM_CROPS = 2
CROP_SIZE = 512  # crops smaller than this are zoomed by whole pixels up to it
SEAM_HALF = 128  # a seam crop reaches this far (or half a tile) from its corner


def overview_level(shapes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """(level, step): the finest level that fits ``OVERVIEW_SIZE``, else the coarsest read every step-th pixel."""
    for level, (h, w) in enumerate(shapes):
        if max(h, w) <= OVERVIEW_SIZE:
            return level, 1
    h, w = shapes[-1]
    return len(shapes) - 1, math.ceil(max(h, w) / OVERVIEW_SIZE)


def shown_channels(plan: SlidePlan) -> list[int]:
    others = [c for c in range(plan.image_channels) if c not in plan.channels]
    return (list(plan.channels) + others)[:SHOWN_CHANNELS]


def busiest_tiles(counts: dict[tuple[int, int], tuple[int, int]], n: int = TILE_CROPS) -> list[tuple[int, int]]:
    """The ``n`` homes with the most cells (raster order breaks ties); none without cells."""
    ranked = sorted((-cells, home) for home, (cells, _) in counts.items() if cells > 0)
    return [home for _, home in ranked[:n]]


def busiest_corners(grid: TileGrid, counts: dict[tuple[int, int], tuple[int, int]],
                    n: int = SEAM_CROPS) -> list[tuple[int, int]]:
    """Level-pixel (y, x) of the ``n`` tile corners on a seam with the most reconciled copies (then cells)
    in the tiles around them."""
    ranked = []
    for r in range(grid.rows + 1):
        for c in range(grid.cols + 1):
            if not (0 < r < grid.rows or 0 < c < grid.cols):
                continue  # an image corner: no seam passes
            around = [counts.get((rr, cc), (0, 0)) for rr in (r - 1, r) for cc in (c - 1, c)]
            reconciled, cells = sum(a[1] for a in around), sum(a[0] for a in around)
            ranked.append((-reconciled, -cells, min(r * grid.tile, grid.height), min(c * grid.tile, grid.width)))
    return [(y, x) for _, _, y, x in sorted(ranked)[:n]]


class _Slide:
    """The slide's pixels and the run's labels at any level, over any region."""

    def __init__(self, plan: SlidePlan) -> None:
        self.plan = plan
        self.image = open_image(plan.spec.input, plan.spec.storage.options())
        self.labels = self.image.label(plan.spec.label_name, complete=False)  # published after QC
        self.channels = shown_channels(plan)

    def read(self, level: int, ys: slice, xs: slice) -> tuple[np.ndarray, np.ndarray]:
        p = self.plan
        pixels = read_channels(self.image.array(level), p.axes, p.plane, self.channels, ys, xs)
        labels = np.asarray(self.labels.array(level)[labels_out.plane_selection(p, ys, xs)])
        return pixels, labels


def write_qc_images(plan: SlidePlan, counts: dict[tuple[int, int], tuple[int, int]]) -> dict:
    """Write the QC PNGs; return the report's ``qc`` entry (paths relative to ``labels/<name>``).

    ``counts`` holds (cells, reconciled copies) per home tile, from the reconcile stage.
    """
    slide = _Slide(plan)
    colours = list(render.PALETTE[: len(slide.channels)])
    level, step = overview_level(plan.label_shapes)
    h, w = plan.label_shapes[level]
    pixels, labels = slide.read(level, slice(0, h, step), slice(0, w, step))
    scales = channel_scales(pixels)
    images = [_save(plan, "overview.png", render.draw_outlines(render.composite(pixels, scales, colours), labels),
                    kind="overview", level=level, region=[0, 0, h, w], step=step)]

    for home in busiest_tiles(counts):
        tile = plan.grid.tile_at(*home)
        region = [tile.core_y0, tile.core_x0, tile.core_y1, tile.core_x1]
        rgb, _ = _crop(slide, scales, colours, region)
        images.append(_save(plan, f"tile_{tile.key}.png", rgb, kind="tile", tile=tile.key, level=plan.level,
                            region=region, zoom=_zoom(region)))

    half = min(plan.grid.tile // 2, SEAM_HALF)
    for y, x in busiest_corners(plan.grid, counts):
        region = [max(y - half, 0), max(x - half, 0), min(y + half, plan.grid.height), min(x + half, plan.grid.width)]
        rgb, crossing = _crop(slide, scales, colours, region, seams=True)
        images.append(_save(plan, f"seam_y{y:05d}_x{x:05d}.png", rgb, kind="seam", corner=[y, x], level=plan.level,
                            region=region, zoom=_zoom(region), cells_crossing=crossing))

    names = slide.image.channel_names
    return dict(
        channels=[dict(index=c, name=names[c] if c < len(names) else f"c{c}", colour=render.hex_colour(col))
                  for c, col in zip(slide.channels, colours)],
        outline=render.hex_colour(render.OUTLINE),
        seam=render.hex_colour(render.SEAM),
        images=images,
    )


def _zoom(region: list[int]) -> int:
    return max(1, CROP_SIZE // max(region[2] - region[0], region[3] - region[1]))


def _crop(slide: _Slide, scales: list[ChannelScale], colours: list, region: list[int],
          seams: bool = False) -> tuple[np.ndarray, int]:
    """A zoomed crop at the segmented level with outlines; with ``seams``, seams dashed and crossing cells
    tinted. Also returns how many cells cross a seam in the crop."""
    y0, x0, y1, x1 = region
    pixels, labels = slide.read(slide.plan.level, slice(y0, y1), slice(x0, x1))
    rgb = render.composite(pixels, scales, colours)
    tile = slide.plan.grid.tile
    rows = [r - y0 for r in range(-(-y0 // tile) * tile, y1, tile) if r > 0]
    cols = [c - x0 for c in range(-(-x0 // tile) * tile, x1, tile) if c > 0]
    crossing = render.crossing_ids(labels, rows, cols) if seams else np.zeros(0)
    if crossing.size:
        rgb = render.tint(rgb, np.isin(labels, crossing), render.SEAM)
    factor = _zoom(region)
    rgb = render.zoom(render.draw_outlines(rgb, labels), factor)
    if seams:
        rgb = render.draw_seams(rgb, [r * factor for r in rows], [c * factor for c in cols])
    return rgb, int(crossing.size)


def _save(plan: SlidePlan, name: str, rgb: np.ndarray, **entry) -> dict:
    labels_out.write_sidecar(plan, f"qc/{name}", render.png_bytes(rgb))
    return dict(path=f"qc/{name}", size=[int(rgb.shape[0]), int(rgb.shape[1])], **entry)
