"""A small picture of a whole level for planning: the mean of every s×s block, read chunk by chunk.

Planning needs the slide's intensity statistics and where its tissue lies before any model time. A pyramid
offers a coarse level; a single-level image (or one whose coarsest level is still large) must not be loaded
whole: a 100k² level is 20 GB a channel. So the level is read a few chunks at a time, each read reduced at
once to its pixel sums per block of the picture. Memory is the picture (at most ``max_pixels`` per channel,
float64 sums) and a few reads in flight, whatever the level's size. A block mean is what a mean-downsampling
pyramid level would have held, so a single-level image is planned as its pyramid would have been.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from cellsam_ray.pipeline.pixels import read_channels

READ_PIXELS = 1024
"""Reads cover at least this many pixels a side (whole chunks), so small chunks do not mean tiny reads."""
READERS = 4


def overview(array, axes, plane, channels, max_pixels: int) -> tuple[np.ndarray, int]:
    """``(picture, stride)``: float32 (len(channels), ceil(h / s), ceil(w / s)) block means of the level
    array's channels, with the smallest stride ``s`` that keeps a channel within ``max_pixels``."""
    height, width = array.shape[axes.index("y")], array.shape[axes.index("x")]
    stride = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    rows, cols = -(-height // stride), -(-width // stride)
    # Block sums in float64; at stride 1 the pixels themselves, in the picture's float32 (the same values:
    # a pixel's float64 sum over one pixel, divided by one, rounds to float32 as the pixel does).
    sums = np.zeros((len(channels), rows, cols), dtype=np.float32 if stride == 1 else np.float64)
    chunks = array.chunks  # inner chunks of a sharded array: a read of one does not fetch its whole shard
    step_y, step_x = (_read_step(chunks[axes.index(a)]) for a in ("y", "x"))
    regions = itertools.product(range(0, height, step_y), range(0, width, step_x))

    def read(region: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        y0, x0 = region
        y1, x1 = min(y0 + step_y, height), min(x0 + step_x, width)
        pixels = read_channels(array, axes, plane, channels, slice(y0, y1), slice(x0, x1))
        if stride == 1:  # a level that fits is its own picture: no blocks to sum
            return y0, x0, pixels
        block = _block_sums(_block_sums(pixels, y0, stride, axis=1), x0, stride, axis=2)
        return y0 // stride, x0 // stride, block

    def add(done: Future) -> None:
        by, bx, block = done.result()
        sums[:, by : by + block.shape[1], bx : bx + block.shape[2]] += block

    with ThreadPoolExecutor(READERS) as pool:
        in_flight: deque[Future] = deque()
        for region in regions:
            in_flight.append(pool.submit(read, region))
            if len(in_flight) >= 2 * READERS:
                add(in_flight.popleft())
        while in_flight:
            add(in_flight.popleft())
    if stride == 1:
        return sums, stride
    counts = np.outer(_block_sizes(height, stride), _block_sizes(width, stride))
    return (sums / counts).astype(np.float32), stride


def _read_step(chunk: int) -> int:
    return chunk * max(1, READ_PIXELS // chunk)


def _block_sums(data: np.ndarray, start: int, stride: int, axis: int) -> np.ndarray:
    """Sums of ``data`` (which begins at pixel ``start`` along ``axis``) over the picture's blocks."""
    n = data.shape[axis]
    first = -start % stride  # offset of the first block boundary inside the data
    edges = [0] + list(range(first if first else stride, n, stride))
    return np.add.reduceat(data, edges, axis=axis, dtype=np.float64)


def _block_sizes(n: int, stride: int) -> np.ndarray:
    """Pixels per block along an axis of ``n`` pixels: ``stride``, the last one what is left."""
    sizes = np.full(-(-n // stride), stride, dtype=np.float64)
    sizes[-1] = n - stride * (len(sizes) - 1)
    return sizes
