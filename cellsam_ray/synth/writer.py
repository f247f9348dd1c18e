"""Writing a synthetic slide as OME-Zarr: the image pyramid plus ``labels/ground_truth``.

Level 0 is rendered and written one chunk at a time (each chunk whole, by one writer), then the coarser
levels are built from it chunk by chunk (``io.pyramid``), so memory is a few chunks whatever the slide size.
Chunks can be rendered by a few threads: numpy and scipy release the GIL in the heavy loops.

Measured on the project machine (2 shared vCPUs), 3 channels, chunk 512, local disk, one thread:

=========  =========  ===========  =======================================
slide      time       peak RSS     notes
=========  =========  ===========  =======================================
1024²      0.8 s      120 MB       67 MB of the RSS is the imports
2048²      3.5-4.4 s  121 MB       the demo size
4096²      12-15 s    122 MB
8192²      51 s       126 MB
16384²     276 s      128 MB       1.3 GB written; the CPUs were shared
=========  =========  ===========  =======================================

Time grows with the pixels (~3-4 Mpx·channel/s); memory does not grow with the slide (Python's traced
peak is ~10 MB at chunk 256 for both 1024² and 2048²). Per chunk, rendering holds about ten float64
arrays of (chunk + 16)², so memory grows with chunk² × workers, not with the slide.
"""

from __future__ import annotations

import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cellsam_ray.errors import UserError
from cellsam_ray.io import ngff as ngff_io
from cellsam_ray.io import pyramid
from cellsam_ray.synth.cells import SPACING
from cellsam_ray.synth.tissue import TissueModel

LABEL_NAME = "ground_truth"
MAX_CHANNELS = 64


@dataclass(frozen=True)
class SlideInfo:
    """What was written, for the caller to print or to open it again."""

    url: str
    ngff: str
    shape: tuple[int, int, int]
    chunk: int
    levels: int
    channel_names: tuple[str, ...]
    pixel_size: float
    label_name: str
    seconds: float


def write_synthetic_slide(
    url: str,
    size: Sequence[int] = (2048, 2048),
    channels: int | None = None,
    ngff: str = "0.5",
    seed: int = 0,
    chunk: int = 512,
    pixel_size: float = 0.5,
    storage_options: dict[str, Any] | None = None,
    workers: int = 1,
    style: str = "tissue",
) -> SlideInfo:
    """Write a synthetic multiplexed tissue slide (c, y, x; uint16) with ground-truth cell labels to ``url``.

    Replaces anything at ``url``. ``size`` is (height, width) at level 0 and ``pixel_size`` its
    micrometres per pixel; levels are added until the coarsest fits in one chunk or 256 pixels. The same
    arguments always give the same bytes, and the level-0 pixels do not depend on ``chunk``.

    ``style`` names one of ``styles.STYLES``: ``tissue`` (the default) is this module's chunk-by-chunk
    multiplexed tissue with ``channels`` markers (default 3); the others are drawn whole in memory with
    their own channels (``channels`` must then be left out), and also get ``labels/nuclei`` when their
    objects are whole cells.
    """
    if style != "tissue":
        return _write_style_slide(url, size, channels, ngff, seed, chunk, pixel_size, storage_options, style)
    channels = 3 if channels is None else channels
    height, width = _check_arguments(size, channels, ngff, seed, chunk, pixel_size, workers)
    start = time.perf_counter()
    model = TissueModel((height, width), seed=seed, channels=channels)
    version = ngff_io.ngff_version(ngff)
    levels = ngff_io.count_levels((height, width), chunk)
    image = ngff_io.create_image(
        url,
        shape=(channels, height, width),
        dtype=np.uint16,
        chunks=(1, chunk, chunk),
        axes=ngff_io.image_axes("cyx", unit="micrometer"),
        scale=(1.0, pixel_size, pixel_size),
        levels=levels,
        version=version,
        channels=[ngff_io.Channel(m.name, m.color, model.window(m)) for m in model.markers],
        name="synthetic tissue",
        storage_options=storage_options,
    )
    labels = ngff_io.create_labels(image, LABEL_NAME, chunks=(chunk, chunk), run_id="synth")
    pixels, cells = image.array(0), labels.array(0)

    def write_chunk(origin: tuple[int, int]) -> None:
        y0, x0 = origin
        region = model.render(y0, min(y0 + chunk, height), x0, min(x0 + chunk, width))
        pixels[:, y0 : y0 + chunk, x0 : x0 + chunk] = region.image
        cells[y0 : y0 + chunk, x0 : x0 + chunk] = region.labels

    origins = list(itertools.product(range(0, height, chunk), range(0, width, chunk)))
    if workers == 1:
        for origin in origins:
            write_chunk(origin)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(write_chunk, origins))  # list() re-raises a worker's exception
    pyramid.build_pyramid(image.arrays(), "image")
    pyramid.build_pyramid(labels.arrays(), "labels")
    ngff_io.publish_label(image, LABEL_NAME)
    return SlideInfo(
        url=str(url),
        ngff=version.name,
        shape=(channels, height, width),
        chunk=chunk,
        levels=levels,
        channel_names=tuple(m.name for m in model.markers),
        pixel_size=float(pixel_size),
        label_name=LABEL_NAME,
        seconds=time.perf_counter() - start,
    )


def _check_arguments(
    size: Sequence[int], channels: int, version: str, seed: int, chunk: int, pixel_size: float, workers: int
) -> tuple[int, int]:
    try:
        height, width = (int(n) for n in size)
    except (TypeError, ValueError):
        raise UserError(f"size must be two integers (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise UserError(f"size must be positive, got {height}x{width}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise UserError(f"channels must be between 1 and {MAX_CHANNELS}, got {channels}")
    ngff_io.ngff_version(version)
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}")
    if chunk < 16:
        raise UserError(f"chunk must be at least 16 pixels, got {chunk}")
    if not (pixel_size > 0 and math.isfinite(pixel_size)):
        raise UserError(f"pixel size must be a positive number of micrometres, got {pixel_size}")
    if math.ceil(height / SPACING) * math.ceil(width / SPACING) >= 2**32 - 1:
        raise UserError(f"a {height}x{width} slide is too large for uint32 cell ids")
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    return height, width


NUCLEI_LABEL = "nuclei"
COLOURS = {"DAPI": "0000FF", "Lamin-B1": "0000FF", "R": "FF0000", "G": "00FF00", "B": "0000FF"}


def _write_style_slide(url, size, channels, ngff, seed, chunk, pixel_size, storage_options, style) -> SlideInfo:
    from cellsam_ray.synth.styles import MAX_PIXELS, STYLES, render_style

    if style not in STYLES:
        raise UserError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    if channels is not None:
        raise UserError(f"style {style} has its own channels: leave out channels")
    height, width = _check_arguments(size, 1, ngff, seed, chunk, pixel_size, 1)
    if height * width > MAX_PIXELS:
        raise UserError(f"style {style} is drawn in memory: at most {MAX_PIXELS} pixels, got {height}x{width}")
    start = time.perf_counter()
    drawn = render_style(style, (height, width), seed)
    version = ngff_io.ngff_version(ngff)
    levels = ngff_io.count_levels((height, width), chunk)
    n = len(drawn.channel_names)
    top = 255 if drawn.image.dtype == np.uint8 else int(np.percentile(drawn.image, 99.8))
    image = ngff_io.create_image(
        url, shape=(n, height, width), dtype=drawn.image.dtype, chunks=(1, chunk, chunk),
        axes=ngff_io.image_axes("cyx", unit="micrometer"), scale=(1.0, pixel_size, pixel_size), levels=levels,
        version=version,
        channels=[ngff_io.Channel(name, COLOURS.get(name, "00FF00" if i == 1 else "FF0000"),
                                  (0, 255) if drawn.stain == "brightfield" else (int(drawn.image.min()), top))
                  for i, name in enumerate(drawn.channel_names)],
        name=f"synthetic {style}", storage_options=storage_options,
    )
    image.array(0)[:] = drawn.image
    pyramid.build_pyramid(image.arrays(), "image")
    written = [(LABEL_NAME, drawn.labels)]
    if drawn.whole_cell:
        written.append((NUCLEI_LABEL, drawn.nuclei))
    for name, values in written:
        ngff_io.write_label_image(image, name, values, chunks=(chunk, chunk), run_id="synth")
    return SlideInfo(url=str(url), ngff=version.name, shape=(n, height, width), chunk=chunk, levels=levels,
                     channel_names=drawn.channel_names, pixel_size=float(pixel_size), label_name=LABEL_NAME,
                     seconds=time.perf_counter() - start)
