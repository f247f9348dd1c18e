"""Turning a ``SegmentSpec`` into a checked, serialisable plan before any model time is spent.

Everything a user can get wrong is caught here, each with a one-line ``UserError``: a path that is not
OME-Zarr, unsupported axes or dtype, z > 1 without a chosen plane, a misspelled channel (the error lists
the available names), a level that does not exist, a tile or halo that does not fit, an existing label
name without ``--overwrite``, weights that are missing, unreadable or fail their checksum, a segmenter
that cannot be imported. The plan also holds the slide-wide intensity scales and
the tissue mask's verdict per tile, both computed once from a coarse level.
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass, field

import numpy as np

from cellsam_ray.errors import UserError
from cellsam_ray.io.ngff import NgffImage, open_image
from cellsam_ray.io.storage import join_url
from cellsam_ray.pipeline.intensity import ChannelScale, channel_scales, combine_roles, tissue_mask
from cellsam_ray.pipeline.workstore import WorkStore
from cellsam_ray.segmenter import segmenter_factory
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.tiling import Tile, TileGrid, plan_grid

SUPPORTED_AXES = ("t", "c", "z", "y", "x")
# Statistics and the tissue mask come from the finest level at most this many pixels per channel.
COARSE_PIXELS = 2048 * 2048


@dataclass(frozen=True)
class SlidePlan:
    """Everything workers need, and nothing that holds a connection: it travels to every Ray process."""

    spec: SegmentSpec
    ngff_version: str
    axes: tuple[str, ...]
    level: int
    level_path: str
    level_shape: tuple[int, ...]
    plane: dict  # axis name -> index, for t and z
    channels: tuple[int, ...]  # channel-axis indices read from the image
    roles: tuple[tuple[int, ...], ...]  # per role (nuclear, whole-cell): indices into ``channels``
    scales: tuple[ChannelScale, ...]  # per entry of ``channels``
    grid: TileGrid
    tiles: tuple[Tile, ...]  # the tiles to segment (tissue), raster order
    skipped: int  # tiles without tissue
    work: WorkStore
    label_shapes: tuple[tuple[int, int], ...]  # every label level, finest first
    label_scales: tuple[tuple[float, float], ...]  # (y, x) pixel size of every label level
    extra: dict = field(default_factory=dict)
    weights_sha256: str | None = None  # of the checkpoint (see ``check_model``); None for another segmenter
    input_fingerprint: dict = field(default_factory=dict)  # the image's geometry, to tell a changed input
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # this run (a resume is a new run)

    @property
    def band(self) -> int:
        return self.spec.band

    @property
    def height(self) -> int:
        return self.grid.height

    @property
    def image_channels(self) -> int:
        """How many channels the image has (the cell table measures all of them, not only ``channels``)."""
        return self.level_shape[self.axes.index("c")] if "c" in self.axes else 1

    @property
    def planned_keys(self) -> frozenset[str]:
        return frozenset(t.key for t in self.tiles)

    @property
    def labels_path(self) -> str:
        return posixpath.join("labels", self.spec.label_name)


def resolve_channels(requested: list[str], names: list[str] | None, n_channels: int, role: str) -> list[int]:
    """Channel indices for names (as in the image's omero metadata) or plain indices."""
    indices = []
    for item in requested:
        if names and item in names:
            indices.append(names.index(item))
        elif item.isdigit() and int(item) < n_channels:
            indices.append(int(item))
        else:
            available = ", ".join(names) if names else f"indices 0..{n_channels - 1} (the image names none)"
            raise UserError(f"{role} channel {item!r} is not in the image; available: {available}")
    return indices


def choose_level(image: NgffImage, spec: SegmentSpec) -> int:
    n = len(image.levels)
    if spec.level is not None:
        if spec.level >= n:
            raise UserError(f"--level {spec.level} does not exist: the image has levels 0..{n - 1}")
        return spec.level
    if spec.pixel_size is not None:
        x_axis = image.axes.index("x")
        sizes = [lvl.scale[x_axis] for lvl in image.levels]
        return int(np.argmin([abs(np.log(s / spec.pixel_size)) for s in sizes]))
    return 0


def check_axes(image: NgffImage, spec: SegmentSpec) -> dict:
    axes = tuple(image.axes)
    if any(a not in SUPPORTED_AXES for a in axes) or "y" not in axes or "x" not in axes:
        raise UserError(f"unsupported axes {list(axes)}: expected a subset of t, c, z, y, x with y and x")
    shape = image.levels[0].shape
    plane = {}
    for axis, chosen in (("t", spec.t), ("z", spec.z)):
        if axis not in axes and chosen:  # a plane other than the only one of an absent axis
            raise UserError(f"--{axis} {chosen} does not exist: the image has no {axis} axis "
                            f"(its axes are {''.join(axes)})")
    if "t" in axes:
        size = shape[axes.index("t")]
        if spec.t >= size:
            raise UserError(f"time point {spec.t} does not exist: the image has {size}")
        plane["t"] = spec.t
    if "z" in axes:
        size = shape[axes.index("z")]
        if spec.z is None and size > 1:
            raise UserError(f"the image has {size} z planes: choose one with --z")
        z = spec.z or 0
        if z >= size:
            raise UserError(f"plane --z {z} does not exist: the image has {size}")
        plane["z"] = z
    dtype = np.dtype(image.levels[0].dtype)
    if dtype.kind not in "uif":
        raise UserError(f"unsupported pixel type {dtype}: expected integer or floating-point pixels")
    return plane


def level_selection(axes: tuple[str, ...], plane: dict, channels, ys: slice, xs: slice) -> tuple:
    """An orthogonal selection of (channels, y, x) from an array with the given axes."""
    sel = []
    for a in axes:
        if a in plane:
            sel.append(plane[a])
        elif a == "c":
            sel.append(list(channels))
        elif a == "y":
            sel.append(ys)
        elif a == "x":
            sel.append(xs)
    return tuple(sel)


def read_channels(array, axes, plane, channels, ys: slice, xs: slice) -> np.ndarray:
    """Pixels (len(channels), y, x) of a level array, whatever its axis order."""
    data = np.asarray(array.get_orthogonal_selection(level_selection(axes, plane, channels, ys, xs)))
    kept = [a for a in axes if a not in plane]
    if "c" not in kept:
        data, kept = data[None], ["c"] + kept
    return np.moveaxis(data, [kept.index("c"), kept.index("y"), kept.index("x")], [0, 1, 2])


def check_model(spec: SegmentSpec) -> str | None:
    """Fail now, not in every actor: the segmenter can be imported, or the checkpoint exists, is a PyTorch
    file and matches ``weights_sha256``. Returns the checkpoint's SHA-256 (None for another segmenter)."""
    if spec.segmenter:
        segmenter_factory(spec.segmenter)
        return None
    if not spec.weights:
        raise UserError("no model: give --weights CHECKPOINT or --segmenter module:attr")
    from cellsam_ray.model.weights import check_checkpoint_file  # imports torch: only when a model runs

    return check_checkpoint_file(spec.weights, storage_options=spec.storage.options(), sha256=spec.weights_sha256)


def make_plan(spec: SegmentSpec) -> SlidePlan:
    image = open_image(spec.input, spec.storage.options())
    axes = tuple(image.axes)
    plane = check_axes(image, spec)
    n_channels = image.levels[0].shape[axes.index("c")] if "c" in axes else 1
    nuclear = resolve_channels(spec.nuclear, image.channel_names, n_channels, "nuclear")
    whole = resolve_channels(spec.whole_cell, image.channel_names, n_channels, "whole-cell")
    channels = tuple(dict.fromkeys(nuclear + whole))
    roles = tuple(tuple(channels.index(c) for c in group) for group in (nuclear, whole) if group)
    level = choose_level(image, spec)
    lvl = image.levels[level]
    height, width = lvl.shape[axes.index("y")], lvl.shape[axes.index("x")]
    grid = plan_grid(height, width, tile=spec.tile, halo=spec.halo, chunk=spec.chunk, band=spec.band)
    weights_sha256 = check_model(spec)
    if weights_sha256:  # every actor loads (and caches) exactly the file checked here, by its content
        spec = spec.model_copy(update={"weights_sha256": weights_sha256})

    # The coarsest level still at least as fine as COARSE_PIXELS gives the statistics and tissue mask.
    coarse_index = level
    for i in range(level, len(image.levels)):
        shape = image.levels[i].shape
        coarse_index = i
        if shape[axes.index("y")] * shape[axes.index("x")] <= COARSE_PIXELS:
            break
    coarse_array = image.array(coarse_index)
    coarse = read_channels(coarse_array, axes, plane, channels, slice(None), slice(None))
    scales = tuple(channel_scales(coarse))
    tiles = grid.tiles()
    if spec.tissue_mask:
        signal = combine_roles(coarse, [list(r) for r in roles], list(scales)).max(axis=0)
        tiles = tiles_with_tissue(tiles, tissue_mask(signal), height, width)
    work_url = spec.work_dir or join_url(spec.input, "labels", spec.label_name, "work")

    label_shapes, label_scales = [], []
    y_axis, x_axis = axes.index("y"), axes.index("x")
    for lv in image.levels:
        label_shapes.append((lv.shape[y_axis], lv.shape[x_axis]))
        label_scales.append((lv.scale[y_axis], lv.scale[x_axis]))
    return SlidePlan(
        spec=spec,
        ngff_version=image.version.name,
        axes=axes,
        level=level,
        level_path=lvl.path,
        level_shape=tuple(lvl.shape),
        plane=plane,
        channels=channels,
        roles=roles,
        scales=scales,
        grid=grid,
        tiles=tuple(tiles),
        skipped=len(grid) - len(tiles),
        work=WorkStore(work_url, spec.storage),
        label_shapes=tuple(label_shapes),
        label_scales=tuple(label_scales),
        weights_sha256=weights_sha256,
        input_fingerprint=input_fingerprint(image),
    )


def input_fingerprint(image: NgffImage) -> dict:
    """What a resume compares of the input, cheaply (metadata only): axes, channel names and every
    level's array path, shape, chunks and dtype."""
    return dict(axes=list(image.axes), channels=list(image.channel_names),
                levels=[[lv.path, list(lv.shape), list(lv.chunks), str(lv.dtype)] for lv in image.levels])


def tiles_with_tissue(tiles: list[Tile], mask: np.ndarray, height: int, width: int) -> list[Tile]:
    """Tiles whose window holds any tissue in the coarse mask (scaled to the level's pixels)."""
    fy, fx = mask.shape[0] / height, mask.shape[1] / width
    kept = []
    for t in tiles:
        y0 = max(int(np.floor(t.window_y0 * fy)), 0)
        x0 = max(int(np.floor(t.window_x0 * fx)), 0)
        y1 = int(np.ceil((t.window_y0 + t.window_size) * fy))
        x1 = int(np.ceil((t.window_x0 + t.window_size) * fx))
        if mask[y0:y1, x0:x1].any():
            kept.append(t)
    return kept
