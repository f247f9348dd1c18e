"""Coarser pyramid levels from the level below, one whole output chunk at a time.

Concurrent partial writes to one zarr chunk (or shard) silently lose updates on object storage, so every
output chunk here is computed from its own block of the finer level and written whole by exactly one call
(the "two-phase" pattern of stack.md §4: workers write level 0, then levels 1.. are built chunk by chunk).
``build_chunk`` is that unit of work, a plain function the pipeline can run as a Ray task; ``build_level``
and ``build_pyramid`` are the sequential drivers. Memory is one output chunk and its ``factor``² source
block, whatever the slide size.

Images are averaged (``mean``). Labels use the mode with foreground priority (``mode``): the most frequent
non-zero id among a pixel's children, ties to the smaller id, background only where every child is
background. It keeps small cells that nearest-neighbour sampling drops and never invents an id, as
interpolation does (ome-zarr-py #482).
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Literal, Sequence

import numpy as np
import zarr

Kind = Literal["image", "labels"]


def downsample(block: np.ndarray, factor: int, kind: Kind, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Downsample ``block`` by ``factor`` along ``axes`` (a partial block at the end counts what is there)."""
    if kind == "image":
        return mean_downsample(block, factor, axes)
    if kind == "labels":
        return mode_downsample(block, factor, axes)
    raise ValueError(f"kind must be 'image' or 'labels', got {kind!r}")


def mean_downsample(block: np.ndarray, factor: int, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Mean of each ``factor``-sized block along ``axes``; integers are rounded half to even."""
    windows, valid = _windows(block, factor, axes, fill=0)
    sums = windows.sum(axis=-1, dtype=np.float64)
    means = sums / valid.sum(axis=-1)
    if block.dtype.kind in "iu":
        info = np.iinfo(block.dtype)
        return np.clip(np.rint(means), info.min, info.max).astype(block.dtype)
    return means.astype(block.dtype)


def mode_downsample(block: np.ndarray, factor: int, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Most frequent non-zero label of each block along ``axes``, ties to the smaller id; 0 if all are 0."""
    windows, _ = _windows(block, factor, axes, fill=0)  # padding is background: it never wins a vote
    n = windows.shape[-1]
    counts = np.zeros(windows.shape, dtype=np.int16)
    for j in range(n):
        counts += windows == windows[..., j : j + 1]
    counts[windows == 0] = -1
    best = counts.max(axis=-1, keepdims=True)
    top = np.where(counts == best, windows, np.iinfo(windows.dtype).max)
    out = top.min(axis=-1)
    return np.where(best[..., 0] < 0, 0, out).astype(block.dtype)


def _windows(block: np.ndarray, factor: int, axes: Sequence[int], fill: int) -> tuple[np.ndarray, np.ndarray]:
    """The block rearranged so each output pixel's ``factor**len(axes)`` children lie on the last axis.

    Returns the children (padded with ``fill`` past the block's end) and a mask of the real ones.
    """
    axes = sorted(a % block.ndim for a in axes)
    pad = [(0, 0)] * block.ndim
    for a in axes:
        pad[a] = (0, -block.shape[a] % factor)
    padded = np.pad(block, pad, constant_values=fill)
    valid = np.pad(np.ones(block.shape, dtype=bool), pad, constant_values=False)
    split: list[int] = []
    for i, n in enumerate(padded.shape):
        split += [n // factor, factor] if i in axes else [n]
    # The factor-sized sub-axes sit right after their parents; move them to the end and merge them.
    inner = [i + 1 + axes.index(i) for i in axes]
    order = [d for d in range(len(split)) if d not in inner] + inner
    out_shape = tuple(n // factor if i in axes else n for i, n in enumerate(padded.shape))
    children = factor ** len(axes)

    def rearrange(a: np.ndarray) -> np.ndarray:
        return a.reshape(split).transpose(order).reshape(out_shape + (children,))

    return rearrange(padded), rearrange(valid)


def output_chunks(target: zarr.Array) -> Iterator[tuple[int, ...]]:
    """Grid coordinates of every chunk (or shard) of ``target``: the units of ``build_chunk``."""
    unit = target.shards or target.chunks
    yield from itertools.product(*(range(math.ceil(n / c)) for n, c in zip(target.shape, unit)))


def build_chunk(
    source: zarr.Array,
    target: zarr.Array,
    chunk: Sequence[int],
    factor: int = 2,
    kind: Kind = "image",
    axes: Sequence[int] = (-2, -1),
) -> None:
    """Compute and write the whole output chunk at grid position ``chunk`` of ``target`` from ``source``.

    ``axes`` are downsampled by ``factor`` (``target`` must be ``ceil(source / factor)`` along them); the
    other axes map one to one.
    """
    axes = [a % source.ndim for a in axes]
    unit = target.shards or target.chunks
    out_sel, in_sel = [], []
    for d, (index, size, n_out, n_in) in enumerate(zip(chunk, unit, target.shape, source.shape)):
        start, stop = index * size, min((index + 1) * size, n_out)
        out_sel.append(slice(start, stop))
        f = factor if d in axes else 1
        if math.ceil(n_in / f) != n_out:
            raise ValueError(f"target shape {target.shape} is not source {source.shape} downsampled by {factor}")
        in_sel.append(slice(start * f, min(stop * f, n_in)))
    block = np.asarray(source[tuple(in_sel)])
    target[tuple(out_sel)] = downsample(block, factor, kind, axes)


def build_level(
    source: zarr.Array, target: zarr.Array, factor: int = 2, kind: Kind = "image", axes: Sequence[int] = (-2, -1)
) -> None:
    """Fill ``target`` from ``source``, chunk by chunk."""
    for chunk in output_chunks(target):
        build_chunk(source, target, chunk, factor, kind, axes)


def build_pyramid(
    levels: Sequence[zarr.Array], kind: Kind, factor: int = 2, axes: Sequence[int] = (-2, -1)
) -> None:
    """Fill ``levels[1:]`` in order, each from the one before (level 0 must be written already)."""
    for source, target in zip(levels[:-1], levels[1:]):
        build_level(source, target, factor, kind, axes)
