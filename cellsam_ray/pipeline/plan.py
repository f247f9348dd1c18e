"""Turning a ``SegmentSpec`` into a checked, serialisable plan before any model time is spent, in two steps.

``survey_slide`` opens the slide and the model and catches everything a user can get wrong, each with a
one-line ``UserError``: a path that is not OME-Zarr or is a label image, unsupported axes or dtype, z > 1
without a chosen plane, a misspelled channel (the error lists the available names), a level that does not
exist, weights that are missing, unreadable or fail their checksum, a segmenter that cannot be imported, a
channel name several channels share, an image the chosen stain cannot read. It computes the slide-wide
intensity scales and the tissue mask once from a coarse level (or an overview read chunk by chunk), and how
each label level is made from the one next to it. ``make_plan`` then lays the windows ``driver.windows``
decided over the survey (a tile or halo that does not fit is refused there) and keeps the tiles with tissue.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from cellsam_ray.errors import UserError
from cellsam_ray.io.layouts import image_url
from cellsam_ray.io.ngff import NgffImage, open_slide
from cellsam_ray.io.pyramid import AxisMap, level_maps
from cellsam_ray.io.storage import StorageAccess, join_url
from cellsam_ray.pipeline.intensity import ChannelScale, tissue_mask
from cellsam_ray.pipeline.overview import overview
from cellsam_ray.pipeline.stain import stain
from cellsam_ray.pipeline.workstore import WorkStore
from cellsam_ray.report import CellSize
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
    scales: tuple[ChannelScale, ...]  # the stain's normalisation: per entry of ``channels`` (fluorescence)
    grid: TileGrid
    tiles: tuple[Tile, ...]  # the tiles to segment (tissue), raster order
    skipped: int  # tiles without tissue
    work: WorkStore
    label_shapes: tuple[tuple[int, int], ...]  # every label level, finest first
    label_scales: tuple[tuple[float, float], ...]  # (y, x) pixel size of every label level
    label_maps: tuple[tuple[AxisMap, ...] | None, ...]  # per label level, how it is built (``pyramid_maps``)
    cell_size: CellSize | None = None  # how the windows were sized to the cells (``driver.cell_size``)
    weights_sha256: str | None = None  # of the checkpoint (see ``check_model``); None for another segmenter
    input_fingerprint: dict = field(default_factory=dict)  # the image's geometry, to tell a changed input
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # this run (a resume is a new run)

    @property
    def band(self) -> int:
        return self.spec.band

    @property
    def image_channels(self) -> int:
        """How many channels the image has (the cell table measures all of them, not only ``channels``)."""
        return self.level_shape[self.axes.index("c")] if "c" in self.axes else 1

    @cached_property  # asked once per neighbour by every reconcile task: computed once per process
    def planned_keys(self) -> frozenset[str]:
        return frozenset(t.key for t in self.tiles)

    @property
    def labels_path(self) -> str:
        return posixpath.join("labels", self.spec.label_name)


def resolve_channels(requested: list[str], names: list[str] | None, n_channels: int, role: str) -> list[int]:
    """Channel indices for names (as in the image's omero metadata) or plain indices.

    A name that several channels carry (cyclic immunofluorescence repeats DAPI every cycle) is refused
    with their indices, so the user picks one by index instead of getting the first by surprise.
    """
    indices = []
    for item in requested:
        matches = [i for i, name in enumerate(names or ()) if name == item]
        if len(matches) > 1:
            shown = ", ".join(map(str, matches[:12])) + (", ..." if len(matches) > 12 else "")
            raise UserError(f"{role} channel {item!r} names {len(matches)} channels (indices {shown}): choose "
                            f"one or more by index, e.g. --{role} {matches[0]}")
        if matches:
            indices.append(matches[0])
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


def check_model(spec: SegmentSpec) -> str | None:
    """Fail now, not in every actor: the segmenter can be imported and takes its options, or the checkpoint
    exists, matches ``weights_sha256``, holds tensors alone and fits the model's config. Returns the
    checkpoint's SHA-256 (None for another segmenter)."""
    if spec.segmenter:
        segmenter_factory(spec.segmenter, spec.segmenter_options)
        return None
    if not spec.weights:
        raise UserError("no model: give --weights CHECKPOINT or --segmenter module:attr")
    from cellsam_ray.model.weights import check_checkpoint_file  # imports torch: only when a model runs

    return check_checkpoint_file(spec.weights, spec.model_config_name, storage_options=spec.storage.options(),
                                 sha256=spec.weights_sha256)


@dataclass(frozen=True)
class SlideSurvey:
    """What a run learns of the slide and its model before the windows are chosen, read once: everything a
    plan holds but the tiling (the image's metadata, a coarse level's statistics and tissue mask, the
    checkpoint's hash). ``driver.windows`` decides the windows with it; ``make_plan`` then plans them."""

    input: str  # the image itself (a bioformats2raw root's first series)
    ngff_version: str
    axes: tuple[str, ...]
    level: int
    level_path: str
    level_shape: tuple[int, ...]
    plane: dict
    channels: tuple[int, ...]
    roles: tuple[tuple[int, ...], ...]
    scales: tuple[ChannelScale, ...]
    tissue: np.ndarray | None  # the coarse tissue mask; None when the spec keeps every tile
    label_shapes: tuple[tuple[int, int], ...]
    label_scales: tuple[tuple[float, float], ...]
    label_maps: tuple[tuple[AxisMap, ...] | None, ...]
    weights_sha256: str | None
    input_fingerprint: dict

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the segmented level."""
        return self.level_shape[self.axes.index("y")], self.level_shape[self.axes.index("x")]


@dataclass(frozen=True)
class CheckedSlide:
    """A slide opened and checked against the spec (metadata only: no pixels read): what ``check_slide``
    finds, the first part of a survey, and all a cohort's check of every slide before model time needs."""

    url: str  # the image itself (a bioformats2raw root's first series)
    image: NgffImage
    plane: dict
    channels: tuple[int, ...]
    roles: tuple[tuple[int, ...], ...]
    level: int


def check_slide(spec: SegmentSpec) -> CheckedSlide:
    """Open the slide the spec names and check its axes, channels and level against the spec, reading
    metadata alone; a ``UserError`` says what is wrong."""
    # A layout that holds the image deeper (bioformats2raw's root) is planned at the image itself, so the
    # labels, the work prefix and every reader find it there.
    url = image_url(spec.input, spec.storage.options())
    image = open_slide(url, spec.storage.options())
    plane = check_axes(image, spec)
    sizes = dict(zip(image.axes, image.levels[0].shape))
    n_channels = sizes.get("c", 1)
    nuclear = resolve_channels(spec.nuclear, image.channel_names, n_channels, "nuclear")
    whole = resolve_channels(spec.whole_cell, image.channel_names, n_channels, "whole-cell")
    channels, roles = stain(spec.stain).channels(nuclear, whole, sizes, image.levels[0].dtype)
    return CheckedSlide(url, image, plane, tuple(channels), tuple(roles), choose_level(image, spec))


def read_overview(url: str, storage: StorageAccess, level: int, axes: tuple[str, ...], plane: dict,
                  channels: tuple[int, ...]) -> np.ndarray:
    """The channels of ``level`` of the image at ``url`` within ``COARSE_PIXELS`` (``overview``): what the
    statistics and the tissue mask are computed from, and the survey's one large read."""
    image = open_slide(url, storage.options())
    return overview(image.array(level), axes, plane, channels, COARSE_PIXELS)[0]


def survey_slide(spec: SegmentSpec, *, read: Callable[..., np.ndarray] = read_overview) -> SlideSurvey:
    """Open and check the slide and the model the spec names, and read what planning needs of them
    (``read``: how the overview is read, ``read_overview`` here or elsewhere with the same arguments)."""
    checked = check_slide(spec)
    url, image, plane, channels, roles, level = (checked.url, checked.image, checked.plane, checked.channels,
                                                 checked.roles, checked.level)
    axes = tuple(image.axes)
    kind = stain(spec.stain)
    lvl = image.levels[level]
    maps = pyramid_maps(image, level)
    weights_sha256 = check_model(spec)

    # The statistics and tissue mask come from the finest level of at most COARSE_PIXELS, or from an
    # overview of the coarsest one when even that is larger (a single-level image), read chunk by chunk.
    coarse_index = level
    for i in range(level, len(image.levels)):
        shape = image.levels[i].shape
        coarse_index = i
        if shape[axes.index("y")] * shape[axes.index("x")] <= COARSE_PIXELS:
            break
    dtype = image.levels[coarse_index].dtype
    coarse = read(url, spec.storage, coarse_index, axes, plane, channels)
    scales = kind.scales(coarse, dtype)
    mask = tissue_mask(kind.tissue_signal(coarse, roles, scales, dtype)) if spec.tissue_mask else None

    y_axis, x_axis = axes.index("y"), axes.index("x")
    return SlideSurvey(
        input=url,
        ngff_version=image.version.name,
        axes=axes,
        level=level,
        level_path=lvl.path,
        level_shape=tuple(lvl.shape),
        plane=plane,
        channels=channels,
        roles=roles,
        scales=scales,
        tissue=mask,
        label_shapes=tuple((lv.shape[y_axis], lv.shape[x_axis]) for lv in image.levels),
        label_scales=tuple((lv.scale[y_axis], lv.scale[x_axis]) for lv in image.levels),
        label_maps=maps,
        weights_sha256=weights_sha256,
        input_fingerprint=input_fingerprint(image),
    )


def make_plan(spec: SegmentSpec, survey: SlideSurvey, *, cell_size: CellSize | None = None) -> SlidePlan:
    """The plan of windows the spec names (``driver.windows`` decided them) over a surveyed slide: the grid,
    the tiles with tissue and the work prefix. Reads nothing."""
    if None in (spec.tile, spec.halo, spec.chunk):
        raise ValueError("the windows are decided (driver.windows) before the run is planned")
    spec = spec.model_copy(update={"input": survey.input})
    if survey.weights_sha256:  # every actor loads (and caches) exactly the file checked, by its content
        spec = spec.model_copy(update={"weights_sha256": survey.weights_sha256})
    height, width = survey.size
    grid = plan_grid(height, width, tile=spec.tile, halo=spec.halo, chunk=spec.chunk, band=spec.band)
    tiles = grid.tiles()
    if survey.tissue is not None:
        tiles = tiles_with_tissue(tiles, survey.tissue, height, width)
    work_url = spec.work_dir or join_url(spec.input, "labels", spec.label_name, "work")
    return SlidePlan(
        spec=spec,
        ngff_version=survey.ngff_version,
        axes=survey.axes,
        level=survey.level,
        level_path=survey.level_path,
        level_shape=survey.level_shape,
        plane=survey.plane,
        channels=survey.channels,
        roles=survey.roles,
        scales=survey.scales,
        grid=grid,
        tiles=tuple(tiles),
        skipped=len(grid) - len(tiles),
        work=WorkStore(work_url, spec.storage),
        label_shapes=survey.label_shapes,
        label_scales=survey.label_scales,
        label_maps=survey.label_maps,
        cell_size=cell_size,
        weights_sha256=survey.weights_sha256,
        input_fingerprint=survey.input_fingerprint,
    )


def pyramid_maps(image: NgffImage, level: int) -> tuple[tuple[AxisMap, ...] | None, ...]:
    """Per label level, how it is made from the level next to it towards the segmented ``level`` (None for
    that one): from the image levels' shapes and scales, which the label levels copy, without ``c``."""
    keep = [i for i, a in enumerate(image.axes) if a != "c"]

    def geometry(k: int) -> tuple[list[int], list[float]]:
        lv = image.levels[k]
        return [lv.shape[i] for i in keep], [lv.scale[i] for i in keep]

    maps: list[tuple[AxisMap, ...] | None] = []
    for k in range(len(image.levels)):
        if k == level:
            maps.append(None)
            continue
        source = k - 1 if k > level else k + 1
        (source_shape, source_scale), (shape, scale) = geometry(source), geometry(k)
        try:
            maps.append(level_maps(source_shape, shape, source_scale, scale))
        except ValueError as err:
            raise UserError(f"pyramid level {image.levels[k].path} cannot be made from level "
                            f"{image.levels[source].path}: {err}") from None
    return tuple(maps)


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
