"""Painting low-resolution masks into a tile's label image on the device, as the reference would.

The reference upsamples every mask on the CPU, 256² → model frame (1024²) → tile, thresholds it and
paints it (a later mask wins). Here only the tile pixels a mask can reach are computed: the 256 → 1024
resize of a crop is exactly the reference's (an integer factor), and the 1024 → tile resize is evaluated
at those pixels with the source indices and weights PyTorch's kernel uses, equal to float rounding.
Painting is a scatter-max of each mask's rank, so overlaps keep the latest mask whatever the order.

Host work per call is one small transfer each way: the masks' pixel windows come to the host (they
decide how masks are grouped into padded grids), and every group's indices go to the device in one
packed tensor. Everything else stays on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

WINDOW_BUDGET = 1 << 21
"""Upsampled pixels computed at once when pasting; masks are grouped by window size to stay under it."""
GATHER_COST = 20
"""Rough cost of one pixel evaluated from gathered taps, in pixels of a whole-mask resize (CPU-measured)."""
THRESHOLD_MARGIN = 1e-3
"""Low-res logits this far below the mask threshold still count as reachable: bilinear values are convex
combinations of their taps, so no pixel beyond a mask's reachable taps can pass the threshold, and
the margin covers float rounding in that argument."""


def reach_threshold(mask_threshold: float) -> float:
    """The low-res logit above which a mask pixel may pass ``sigmoid(upsampled) > mask_threshold``."""
    return math.log(mask_threshold / (1 - mask_threshold)) - THRESHOLD_MARGIN


@dataclass(frozen=True)
class Taps:
    """Bilinear taps along one axis: source indices ``i0``, ``i1`` and their weights ``w0``, ``w1``."""

    i0: Tensor
    i1: Tensor
    w0: Tensor
    w1: Tensor

    def at(self, index: Tensor) -> Taps:
        return Taps(self.i0[index], self.i1[index], self.w0[index], self.w1[index])


def axis_taps(in_size: int, out_size: int) -> Taps:
    """Taps of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis, as PyTorch builds them.

    The source position is ``scale·(j + ½) − ½`` with ``scale = in/out`` in float32, evaluated with one
    rounding (the kernel's fused multiply-add) and clamped at 0; the upper tap stops at the last pixel.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    centres = torch.arange(out_size, dtype=torch.float32) + 0.5
    source = (scale.double() * centres.double() - 0.5).float().clamp(min=0)
    i0 = source.floor().long().clamp(max=in_size - 1)
    w1 = (source - i0).clamp(0, 1)
    return Taps(i0, torch.where(i0 < in_size - 1, i0 + 1, i0), 1 - w1, w1)


@dataclass(frozen=True)
class Axis:
    """One axis of the reference's mask resizes: low-res -> model frame (integer factor) -> tile.

    The first resize is reproduced exactly by resizing a crop of the low-res mask (with an integer
    factor every source position is an exact shift of the full resize's); the second is evaluated only
    at the tile pixels wanted, from ``to_tile``.
    """

    low: int
    factor: int
    to_tile: Taps  # tile pixel -> model-frame taps, on the device
    first: Tensor  # lowest low-res index each tile pixel reads; non-decreasing; device
    last: Tensor  # highest low-res index each tile pixel reads; non-decreasing; device
    first_host: list[int]
    last_host: list[int]

    @property
    def tile(self) -> int:
        return len(self.first_host)

    def window(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """[start, stop) of the tile pixels that read any low-res index in [lo, hi] (per mask)."""
        return torch.searchsorted(self.last, lo), torch.searchsorted(self.first, hi, right=True)

    def crop(self, start: int, length: int) -> tuple[int, int]:
        """(first, length) of the low-res pixels that tile pixels [start, start + length) read.

        Resizing exactly this crop reproduces the full resize at those pixels: every needed model-frame
        pixel sits at least two pixels inside the crop's resize, so neither edge clamp touches it.
        """
        first = self.first_host[start]
        return first, self.last_host[start + length - 1] + 1 - first


@lru_cache(maxsize=32)
def axis(low: int, model: int, tile: int, device: torch.device) -> Axis:
    """The :class:`Axis` for these sizes, built (and copied to ``device``) once per process."""
    with torch.inference_mode(False):  # normal tensors, whatever mode the first caller is in
        return _build_axis(low, model, tile, device)


def _build_axis(low: int, model: int, tile: int, device: torch.device) -> Axis:
    if model % low:
        raise ValueError(f"model frame {model} is not a multiple of the low-res mask size {low}")
    to_model, to_tile = axis_taps(low, model), axis_taps(model, tile)
    first, last = to_model.i0[to_tile.i0], to_model.i1[to_tile.i1]
    on_device = Taps(*(t.to(device) for t in (to_tile.i0, to_tile.i1, to_tile.w0, to_tile.w1)))
    return Axis(low, model // low, on_device, first.to(device), last.to(device), first.tolist(), last.tolist())


class _Upload:
    """Host integer lists gathered for one host-to-device copy; each list is read back as a slice."""

    def __init__(self) -> None:
        self.parts: list[list[int]] = []
        self.size = 0

    def add(self, values: list[int]) -> slice:
        self.parts.append(values)
        self.size += len(values)
        return slice(self.size - len(values), self.size)

    def send(self, device: torch.device) -> Tensor:
        packed = torch.from_numpy(np.fromiter((v for part in self.parts for v in part), np.int64, self.size))
        if device.type == "cuda":
            packed = packed.pin_memory()
        return packed.to(device, non_blocking=True)


@dataclass(frozen=True)
class _Plan:
    """A group of masks pasted together along one axis: their tile windows and low-res crops (as slices of
    the packed upload) and the group's padded sizes."""

    start: slice  # first tile pixel of each window
    length: slice  # window lengths
    crop: slice  # first low-res index of each crop (all crops have the group's common length)
    size: int  # padded window length
    crop_size: int  # common crop length

    @classmethod
    def build(cls, axis: Axis, windows: list[tuple[int, int]], upload: _Upload) -> _Plan:
        crops = [axis.crop(start, length) for start, length in windows]
        crop_size = max(length for _, length in crops)
        crop_starts = [min(first, axis.low - crop_size) for first, _ in crops]  # shift back at the far edge
        return cls(upload.add([w[0] for w in windows]), upload.add([w[1] for w in windows]), upload.add(crop_starts),
                   max(length for _, length in windows), crop_size)

    def grid(self, ints: Tensor, tile: int) -> tuple[Tensor, Tensor]:
        """(g, size) tile pixel indices (clamped into the tile) and whether each lies in its window."""
        steps = torch.arange(self.size, device=ints.device)
        return (ints[self.start][:, None] + steps).clamp(max=tile - 1), steps < ints[self.length][:, None]


def paint(labels: Tensor, low: Tensor, reach: Tensor, rank: Tensor, rows: Axis, cols: Axis,
          mask_threshold: float) -> None:
    """Upsample each mask where its reachable low-res pixels can land in the tile, and max-paint its rank.

    ``labels`` is the flat (H·W,) int32 tile; ``low`` (n, s, s) float32 logits, ``reach`` where they may
    pass the threshold (all False for a rejected mask), ``rank`` (n,) the label each mask paints. Small
    windows are evaluated pixel by pixel; a mask whose window covers much of the tile is cheaper to
    resize whole, exactly as the reference does.
    """
    height, width = rows.tile, cols.tile
    span = torch.arange(low.shape[-1], device=low.device)
    any_row, any_col = reach.any(dim=2), reach.any(dim=1)
    lo_y = torch.where(any_row, span, low.shape[-1]).amin(1)
    hi_y = torch.where(any_row, span, -1).amax(1)
    lo_x = torch.where(any_col, span, low.shape[-1]).amin(1)
    hi_x = torch.where(any_col, span, -1).amax(1)
    y0, y1 = rows.window(lo_y, hi_y)
    x0, x1 = cols.window(lo_x, hi_x)
    lengths_y, lengths_x = (y1 - y0).clamp(min=0), (x1 - x0).clamp(min=0)  # 0: the mask reaches nothing
    windows = torch.stack((y0, lengths_y, x0, lengths_x), dim=1).tolist()  # the host sync of this call
    frame_pixels = rows.factor * rows.low * cols.factor * cols.low
    whole = [i for i, w in enumerate(windows) if GATHER_COST * w[1] * w[3] > frame_pixels + height * width]
    per_group = max(WINDOW_BUDGET // frame_pixels, 1)
    upload = _Upload()
    whole_groups = [upload.add(whole[start : start + per_group]) for start in range(0, len(whole), per_group)]
    resized = set(whole)
    windowed = [[0, 0, 0, 0] if i in resized else w for i, w in enumerate(windows)]
    plans = [
        (upload.add(group), _Plan.build(rows, [(windows[i][0], windows[i][1]) for i in group], upload),
         _Plan.build(cols, [(windows[i][2], windows[i][3]) for i in group], upload))
        for group in _groups(windowed, frame_pixels / (height * width))
    ]
    ints = upload.send(low.device)
    model_size = (rows.factor * rows.low, cols.factor * cols.low)
    for group in whole_groups:
        index = ints[group]
        frame = F.interpolate(low[index, None], model_size, mode="bilinear", align_corners=False)
        values = F.interpolate(frame, (height, width), mode="bilinear", align_corners=False)[:, 0]
        painted = torch.where(torch.sigmoid(values) > mask_threshold, rank[index][:, None, None], 0).amax(0)
        torch.maximum(labels, painted.flatten(), out=labels)
    for group, y_plan, x_plan in plans:
        _paint_windows(labels, low, rank, ints[group], ints, y_plan, x_plan, rows, cols, mask_threshold)


def _paint_windows(
    labels: Tensor, low: Tensor, rank: Tensor, index: Tensor, ints: Tensor, y_plan: _Plan, x_plan: _Plan, rows: Axis,
    cols: Axis, mask_threshold: float,
) -> None:
    """Evaluate the masks ``index`` at the tile pixels of their windows and scatter-max them."""
    height, width = rows.tile, cols.tile
    y_start, x_start = ints[y_plan.crop], ints[x_plan.crop]
    y_crop = y_start[:, None] + torch.arange(y_plan.crop_size, device=low.device)
    x_crop = x_start[:, None] + torch.arange(x_plan.crop_size, device=low.device)
    crops = low[index[:, None, None], y_crop[:, :, None], x_crop[:, None, :]]
    frame_size = (rows.factor * y_plan.crop_size, cols.factor * x_plan.crop_size)
    frame = F.interpolate(crops[:, None], frame_size, mode="bilinear", align_corners=False)[:, 0]
    y, y_valid = y_plan.grid(ints, height)
    x, x_valid = x_plan.grid(ints, width)
    # Model-frame taps of each wanted tile pixel, relative to the group's crops. Pixels of the padded grid
    # outside a mask's own window (discarded below) may tap past its crop, so taps are clamped into it.
    r = rows.to_tile.at(y)
    c = cols.to_tile.at(x)
    r0, r1 = ((tap - rows.factor * y_start[:, None]).clamp(0, frame_size[0] - 1) for tap in (r.i0, r.i1))
    c0, c1 = ((tap - cols.factor * x_start[:, None]).clamp(0, frame_size[1] - 1) for tap in (c.i0, c.i1))
    g = torch.arange(len(index), device=low.device)[:, None]
    values = bilinear_at(frame, g, r0, r1, r.w0, r.w1, c0, c1, c.w0, c.w1)
    inside = (torch.sigmoid(values) > mask_threshold) & y_valid[:, :, None] & x_valid[:, None, :]
    painted = torch.where(inside, rank[index][:, None, None], 0)
    labels.scatter_reduce_(0, (y[:, :, None] * width + x[:, None, :]).flatten(), painted.flatten(), reduce="amax")


def bilinear_at(
    frame: Tensor, g: Tensor, r0: Tensor, r1: Tensor, rw0: Tensor, rw1: Tensor, c0: Tensor, c1: Tensor, cw0: Tensor,
    cw1: Tensor,
) -> Tensor:
    """Bilinear values (g, R, C) of ``frame`` at row taps (g, R) and column taps (g, C).

    Same taps, weights and order of operations as PyTorch's CPU kernel (along columns, then rows).
    """
    r0, r1, rw0, rw1 = (t[:, :, None] for t in (r0, r1, rw0, rw1))
    c0, c1, cw0, cw1 = (t[:, None, :] for t in (c0, c1, cw0, cw1))
    g = g[:, :, None]
    top = frame[g, r0, c0] * cw0 + frame[g, r0, c1] * cw1
    bottom = frame[g, r1, c0] * cw0 + frame[g, r1, c1] * cw1
    return top * rw0 + bottom * rw1


def _groups(windows: list[list[int]], frame_scale: float) -> list[list[int]]:
    """Masks with non-empty windows, grouped by size so each group's padded grid stays under the budget.

    ``frame_scale`` converts tile pixels to model-frame pixels, which dominate when tiles are small.
    """
    nonempty = (i for i, w in enumerate(windows) if w[1] > 0 and w[3] > 0)
    order = sorted(nonempty, key=lambda i: windows[i][1] * windows[i][3])
    budget = WINDOW_BUDGET / max(frame_scale, 1.0)
    groups: list[list[int]] = []
    current: list[int] = []
    rows = cols = 0
    for i in order:
        new_rows, new_cols = max(rows, windows[i][1]), max(cols, windows[i][3])
        if current and (len(current) + 1) * new_rows * new_cols > budget:
            groups.append(current)
            current, new_rows, new_cols = [], windows[i][1], windows[i][3]
        current.append(i)
        rows, cols = new_rows, new_cols
    if current:
        groups.append(current)
    return groups
