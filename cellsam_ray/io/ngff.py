"""OME-Zarr (NGFF) images and label images: the versions, reading, and creating them for writing.

The two versions we read and write differ in where things live, not in what they say:

=========  ===========  ====================================================  ================
version    zarr format  OME metadata                                          dimension names
=========  ===========  ====================================================  ================
0.4        2            top-level attributes; ``version`` inside multiscales  none
0.5        3            under ``attributes["ome"]`` with ``ome.version``      on every array
=========  ===========  ====================================================  ================

So each version is an object (``V04``, ``V05``) that the rest of the code asks, as ome-zarr-py's
``format.py`` does, instead of branching on version strings. The metadata is a few dictionaries written
here: ome-zarr-py's writer functions would drop or duplicate what we keep, and importing ome-zarr-py costs
every process that reads a slide its dask import (notes/ngff.md, piece by piece). What this package writes
into others' images, a label image's metadata, is checked with ome-zarr-models before anything is written
(``label_metadata``). Arrays are created empty, with their final shapes and chunks, so that many writers
can later fill whole chunks in parallel.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np
import zarr

from cellsam_ray.errors import UserError
from cellsam_ray.io import pyramid
from cellsam_ray.io.layouts import image_group
from cellsam_ray.io.storage import Mode, open_group, relative_url

if TYPE_CHECKING:
    import dask.array

# Attribute of a label image this package writes: {"complete": bool, "run_id": str} (see NgffImage.label).
RUN_MARKER = "cellsam_ray"
# Axes halved at each pyramid level. z is kept: slides are 2-D and z stacks are usually anisotropic.
DOWNSAMPLED_AXES = ("y", "x")


# --------------------------------------------------------------------------------------------- versions
class NgffVersion:
    """One NGFF version: where its metadata lives and how its arrays are created."""

    name: ClassVar[str]
    zarr_format: ClassVar[int]
    models: ClassVar[str]  # ome-zarr-models' package for this version

    def read_ome(self, group: zarr.Group) -> dict[str, Any]:
        """The group's OME metadata (``multiscales``, ``omero``, ``image-label``, ``labels``) as one dict."""
        raise NotImplementedError

    def write_ome(self, group: zarr.Group, ome: Mapping[str, Any]) -> None:
        """Add ``ome``'s keys to the group's OME metadata, keeping the other keys."""
        raise NotImplementedError

    def multiscale(self, name: str, axes: Sequence[Axis], datasets: list[dict], kind: str) -> dict[str, Any]:
        """One entry of ``multiscales``; ``kind`` names the downsampling (e.g. "mean", "mode")."""
        return {
            "name": name,
            "axes": [axis.to_json() for axis in axes],
            "datasets": datasets,
            "type": kind,
        }

    def image_label(self, source: str = "../../") -> dict[str, Any]:
        """The ``image-label`` metadata of a label image whose source image is at ``source``."""
        return {"source": {"image": source}}

    def array_options(self, axes: Sequence[str]) -> dict[str, Any]:
        """Extra ``create_array`` arguments for an array with these axes."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"NGFF {self.name}"


class _V04(NgffVersion):
    name = "0.4"
    zarr_format = 2
    models = "ome_zarr_models.v04"

    def read_ome(self, group: zarr.Group) -> dict[str, Any]:
        return dict(group.attrs)

    def write_ome(self, group: zarr.Group, ome: Mapping[str, Any]) -> None:
        group.attrs.update(dict(ome))

    def multiscale(self, name: str, axes: Sequence[Axis], datasets: list[dict], kind: str) -> dict[str, Any]:
        return {"version": self.name, **super().multiscale(name, axes, datasets, kind)}

    def image_label(self, source: str = "../../") -> dict[str, Any]:
        return {"version": self.name, **super().image_label(source)}

    def array_options(self, axes: Sequence[str]) -> dict[str, Any]:
        # 0.4 requires "/" between chunk indices; zarr v2 defaults to "." (ome-zarr-py's FormatV04 says the same).
        return {"chunk_key_encoding": {"name": "v2", "separator": "/"}}


class _V05(NgffVersion):
    name = "0.5"
    zarr_format = 3
    models = "ome_zarr_models.v05"

    def read_ome(self, group: zarr.Group) -> dict[str, Any]:
        return dict(group.attrs.get("ome", {}))

    def write_ome(self, group: zarr.Group, ome: Mapping[str, Any]) -> None:
        # Every OME group carries ome.version in 0.5, including "labels" (ome-zarr-py 0.18 forgets it there:
        # notes/ngff.md).
        group.attrs["ome"] = {**self.read_ome(group), **dict(ome), "version": self.name}

    def array_options(self, axes: Sequence[str]) -> dict[str, Any]:
        return {"dimension_names": list(axes)}


V04 = _V04()
V05 = _V05()
VERSIONS: dict[str, NgffVersion] = {v.name: v for v in (V04, V05)}


def ngff_version(name: str | NgffVersion) -> NgffVersion:
    """The version object for "0.4" or "0.5"."""
    if isinstance(name, NgffVersion):
        return name
    try:
        return VERSIONS[str(name)]
    except KeyError:
        raise UserError(f"unsupported NGFF version {name!r}: choose one of {', '.join(VERSIONS)}") from None


def detect_version(group: zarr.Group) -> NgffVersion:
    """The NGFF version of an OME-Zarr group; UserError if it is not one we read."""
    attrs = dict(group.attrs)
    if group.metadata.zarr_format == 3:
        version = attrs.get("ome", {}).get("version") if isinstance(attrs.get("ome"), dict) else None
    else:
        found = attrs.get("multiscales") or [{}]
        version = found[0].get("version") if isinstance(found, list) and isinstance(found[0], dict) else None
        if version is None:
            version = (attrs.get("image-label") or {}).get("version")
        if version is None and "labels" in attrs:
            version = V04.name  # a 0.4 "labels" group has no version of its own
    if version is None:
        raise UserError(f"{_where(group)} is not an OME-Zarr image (no OME metadata found)")
    if version not in VERSIONS or VERSIONS[version].zarr_format != group.metadata.zarr_format:
        raise UserError(
            f"{_where(group)} is OME-Zarr {version} in zarr v{group.metadata.zarr_format}; "
            f"supported: {', '.join(f'{v.name} (zarr v{v.zarr_format})' for v in VERSIONS.values())}"
        )
    return VERSIONS[version]


# ------------------------------------------------------------------------------------------ descriptions
@dataclass(frozen=True)
class Axis:
    """One NGFF axis: a name, a type ("channel", "space", "time") and a physical unit for space/time."""

    name: str
    type: str | None = None
    unit: str | None = None

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in (("name", self.name), ("type", self.type), ("unit", self.unit)) if v}


def image_axes(names: str = "cyx", unit: str = "micrometer") -> tuple[Axis, ...]:
    """Axes for a name string such as "cyx" or "tczyx": c is a channel, t time, z/y/x space in ``unit``."""
    kinds = {"c": ("channel", None), "t": ("time", None), "z": ("space", unit), "y": ("space", unit),
             "x": ("space", unit)}
    unknown = [n for n in names if n not in kinds]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"axis names must be distinct letters from 'tczyx', got {names!r}")
    return tuple(Axis(n, *kinds[n]) for n in names)


@dataclass(frozen=True)
class Channel:
    """A channel as shown by viewers (``omero``): its name, hex colour and display window (start, end)."""

    name: str
    color: str = "FFFFFF"
    window: tuple[float, float] | None = None


@dataclass(frozen=True)
class Level:
    """One pyramid level: its array path, geometry, and physical scale/translation per axis.

    ``chunks`` is the unit one writer must own whole: the shard shape for sharded arrays.
    """

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class NgffImage:
    """An opened OME-Zarr multiscale image (or label image): what the pipeline needs to know about it."""

    group: zarr.Group
    version: NgffVersion
    axes: tuple[str, ...]
    axis_types: tuple[str | None, ...]
    axis_units: tuple[str | None, ...]
    levels: tuple[Level, ...]
    channel_names: tuple[str, ...]
    label_names: tuple[str, ...]
    name: str | None = None

    def array(self, level: int = 0) -> zarr.Array:
        """The zarr array of a pyramid level."""
        return self.group[self.levels[level].path]

    def arrays(self) -> list[zarr.Array]:
        return [self.array(i) for i in range(len(self.levels))]

    def dask_levels(self) -> list[dask.array.Array]:
        """Every level as a lazy dask array, level 0 first, one dask chunk per stored chunk (per shard when
        sharded): for analyses larger than memory, which read only what they compute. dask is imported
        here, not with this module, so that opening an image does not pay for it."""
        import dask.array as da

        return [da.from_zarr(self.array(i), chunks=level.chunks) for i, level in enumerate(self.levels)]

    def label(self, name: str, *, complete: bool = True) -> NgffImage:
        """The label image ``labels/<name>``, opened like its image.

        A label image is complete once it is listed in ``labels`` and, if this package wrote it, marked
        complete (``cellsam_ray.complete`` in its attributes, set after its last level is written). With
        ``complete=False`` an unlisted, unfinished one is opened too: the run that writes it reads it back.
        """
        has = name in self.group["labels"] if "labels" in self.group else False
        listed = listed_labels(self.group, self.version)
        if complete and name not in listed:
            if has:
                raise UserError(f"labels/{name} in {_where(self.group)} is incomplete: the run writing it has not "
                                f"finished (see labels/{name}/report.json)")
            raise UserError(f"{_where(self.group)} has no label image {name!r} (has: {list(self.label_names)})")
        if not has:
            raise UserError(f"{_where(self.group)} has no label image {name!r} (has: {list(self.label_names)})")
        label = read_image(self.group["labels"][name])
        if complete:
            require_complete(label)
        return label


def require_complete(label: NgffImage) -> None:
    """UserError for a label image this package started and has not finished writing."""
    marker = label.group.attrs.get(RUN_MARKER)
    if isinstance(marker, dict) and not marker.get("complete", False):
        raise UserError(f"{_where(label.group)} is incomplete: the run writing it (run {marker.get('run_id')}) has "
                        "not finished (see its report.json)")


def listed_labels(group: zarr.Group, version: NgffVersion) -> tuple[str, ...]:
    """The names the ``labels`` group lists; a UserError, leaving it as it is, for a listing we do not
    understand (rewriting it could drop labels others listed)."""
    if "labels" not in group:
        return ()
    labels_group = group["labels"]
    listed = version.read_ome(labels_group).get("labels", [])
    if not isinstance(listed, list) or not all(isinstance(n, str) and n and "/" not in n for n in listed):
        raise UserError(f"{_where(labels_group)} has a malformed 'labels' list ({json.dumps(listed)[:80]}): "
                        "expected a list of label names; it was left unchanged: fix it before writing labels here")
    return tuple(listed)


# --------------------------------------------------------------------------------------------- reading
def open_image(
    url: str | zarr.Group, storage_options: dict[str, Any] | None = None, *, mode: Mode = "r"
) -> NgffImage:
    """Open an OME-Zarr image (or label image) at a path or URL; ``mode="r+"`` to add labels to it.

    A bioformats2raw root opens as its first series (``layouts``)."""
    group = url if isinstance(url, zarr.Group) else open_group(url, storage_options, mode=mode)
    return read_image(image_group(group))


def open_labels(url: str, name: str = "cells", storage_options: dict[str, Any] | None = None) -> NgffImage:
    """The complete label image ``labels/<name>`` of the image at ``url``: what a run wrote."""
    return open_image(url, storage_options).label(name)


def open_slide(url: str, storage_options: dict[str, Any] | None = None) -> NgffImage:
    """Open the image a run reads, as ``open_image`` does, refusing a label image or a ``labels`` group:
    segmenting one would write a label group inside it, where no viewer looks. The error names the image
    they belong to."""
    group = image_group(open_group(url, storage_options))
    attrs = dict(group.attrs)  # read before the version: ome-zarr-py's 0.5 labels groups have none (notes/ngff.md)
    ome = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    if isinstance(ome.get("image-label"), dict):
        source = (ome["image-label"].get("source") or {}).get("image") or "../../"
        raise UserError(f"{url} is a label image of {relative_url(url, source)}, not an image to segment: give "
                        "that image")
    if "labels" in ome and "multiscales" not in ome:
        raise UserError(f"{url} is the labels group of {relative_url(url, '..')}, not an image to segment: give "
                        "that image")
    return read_image(group)


def read_image(group: zarr.Group) -> NgffImage:
    """Describe the first multiscale image of an opened group; UserError if it is not one."""
    version = detect_version(group)
    ome = version.read_ome(group)
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise UserError(f"{_where(group)} is OME-Zarr but not an image (no multiscales)")
    ms = multiscales[0]
    try:
        axes = tuple(Axis(a["name"], a.get("type"), a.get("unit")) for a in ms["axes"])
        levels = tuple(_read_level(group, ds, ms.get("coordinateTransformations"), len(axes))
                       for ds in ms["datasets"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{_where(group)} has malformed multiscales metadata: {err}") from None
    channels = ome.get("omero", {}).get("channels", []) if isinstance(ome.get("omero"), dict) else []
    try:
        label_names = listed_labels(group, version)
    except UserError:  # the pixels can still be read; writing or finding labels refuses (see listed_labels)
        label_names = ()
    return NgffImage(
        group=group,
        version=version,
        axes=tuple(a.name for a in axes),
        axis_types=tuple(a.type for a in axes),
        axis_units=tuple(a.unit for a in axes),
        levels=levels,
        channel_names=tuple(str(c.get("label", "")) for c in channels),
        label_names=label_names,
        name=ms.get("name"),
    )


def _read_level(group: zarr.Group, dataset: dict, global_transforms: list | None, ndim: int) -> Level:
    path = dataset["path"]
    try:
        array = group[path]
    except KeyError:
        raise UserError(f"{_where(group)}: multiscales names array {path!r}, which does not exist") from None
    if not isinstance(array, zarr.Array) or array.ndim != ndim:
        raise UserError(f"{_where(group)}/{path} is not a {ndim}-d array as its axes say")
    scale, translation = _transforms(dataset.get("coordinateTransformations", []), ndim)
    if global_transforms:
        # Dataset transforms apply first, then the multiscale-wide ones (NGFF 0.4/0.5).
        g_scale, g_translation = _transforms(global_transforms, ndim)
        translation = tuple(gs * t + gt for gs, t, gt in zip(g_scale, translation, g_translation))
        scale = tuple(gs * s for gs, s in zip(g_scale, scale))
    return Level(
        path=path,
        shape=tuple(array.shape),
        chunks=tuple(array.shards or array.chunks),
        dtype=np.dtype(array.dtype),
        scale=scale,
        translation=translation,
    )


def _transforms(transforms: list[dict], ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale, translation = (1.0,) * ndim, (0.0,) * ndim
    for t in transforms:
        if t.get("type") == "scale":
            scale = tuple(float(v) for v in t["scale"])
        elif t.get("type") == "translation":
            translation = tuple(float(v) for v in t["translation"])
    return scale, translation


def _where(group: zarr.Group) -> str:
    return f"{group.store}{'/' + group.path if group.path else ''}"


# --------------------------------------------------------------------------------------------- writing
def count_levels(shape_yx: Sequence[int], chunk: int, smallest: int = 256) -> int:
    """Pyramid levels from ``shape_yx`` until the coarsest fits in one chunk or in ``smallest`` pixels."""
    n, size = 1, max(shape_yx)
    while size > max(chunk, smallest):
        size = math.ceil(size / 2)
        n += 1
    return n


def level_shape(shape: Sequence[int], axes: Sequence[str], level: int) -> tuple[int, ...]:
    """The shape of pyramid level ``level``: y and x halved per level (rounding up), other axes kept."""
    f = 2**level
    return tuple(math.ceil(n / f) if a in DOWNSAMPLED_AXES else int(n) for n, a in zip(shape, axes))


def level_transforms(
    scale0: Sequence[float], axes: Sequence[str], level: int, translation0: Sequence[float] | None = None
) -> list[dict[str, Any]]:
    """Scale and translation of level ``level``: pixels 2**level times larger, centred on the ones they average."""
    f = 2**level
    translation0 = translation0 or (0.0,) * len(axes)
    scale, translation = [], []
    for s, t, a in zip(scale0, translation0, axes):
        factor = f if a in DOWNSAMPLED_AXES else 1
        scale.append(float(s) * factor)
        translation.append(float(t) + float(s) * (factor - 1) / 2)
    return [{"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]


def create_image(
    url: str | zarr.Group,
    *,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    axes: Sequence[Axis],
    scale: Sequence[float],
    levels: int,
    version: str | NgffVersion = V05,
    channels: Sequence[Channel] | None = None,
    name: str = "image",
    storage_options: dict[str, Any] | None = None,
) -> NgffImage:
    """Create an empty multiscale image (replacing anything at ``url``) with its metadata written.

    ``scale`` is the physical pixel size per axis at level 0 (1 for channel axes). Level k is ``s{k}``,
    with y/x halved per level and chunks clipped to the level's shape. The pixels are written afterwards,
    whole chunks at a time (level 0 first, then ``pyramid.build_pyramid``).
    """
    version = ngff_version(version)
    axes = tuple(axes)
    names = [a.name for a in axes]
    if not (len(shape) == len(chunks) == len(scale) == len(axes)):
        raise ValueError("shape, chunks, scale and axes must have one entry per axis")
    if levels < 1:
        raise ValueError("an image has at least one level")
    if channels is not None:
        if "c" not in names or len(channels) != shape[names.index("c")]:
            raise ValueError("give one Channel per entry of the c axis")
    group = url if isinstance(url, zarr.Group) else open_group(
        url, storage_options, mode="w", zarr_format=version.zarr_format
    )
    datasets = _create_levels(group, version, shape, dtype, chunks, names, levels, scale)
    ome: dict[str, Any] = {"multiscales": [version.multiscale(name, axes, datasets, kind="mean")]}
    if channels is not None:
        ome["omero"] = _omero(channels, np.dtype(dtype))
    version.write_ome(group, ome)
    return read_image(group)


_TYPE_OF_NAME = {"x": "space", "y": "space", "z": "space", "t": "time"}


def label_metadata(image: NgffImage, name: str) -> dict[str, Any]:
    """The OME metadata (``multiscales``, ``image-label``) of label image ``labels/<name>`` of ``image``, as
    ome-zarr-models accepts it; a UserError, before anything is written, where it would not.

    It copies the image's axes without ``c`` and each level's transforms (whatever pyramid another writer
    made). An axis the image leaves untyped (NGFF 0.4 allows it) gets the type its name says (x, y, z:
    space; t: time), so such an image gets a valid label; what ome-zarr-models still refuses is the image's
    own metadata: levels that get finer, repeated axis names. A run checks it at its start
    (``driver.lifecycle``): a run that replaces a label creates the new one only after segmenting.
    """
    if not name or "/" in name:
        raise UserError(f"invalid label name {name!r}")
    version = image.version
    keep = [i for i, a in enumerate(image.axes) if a != "c"]
    axes = [Axis(image.axes[i], image.axis_types[i] or _TYPE_OF_NAME.get(image.axes[i]), image.axis_units[i])
            for i in keep]
    datasets = [{
        "path": level.path,
        "coordinateTransformations": [
            {"type": "scale", "scale": [level.scale[i] for i in keep]},
            {"type": "translation", "translation": [level.translation[i] for i in keep]},
        ],
    } for level in image.levels]
    ome = {
        "multiscales": [version.multiscale(name, axes, datasets, kind="mode")],
        "image-label": version.image_label("../../"),
    }
    _check(version, ome, f"{_where(image.group)}/labels/{name}")
    return ome


def _check(version: NgffVersion, ome: dict[str, Any], where: str) -> None:
    """UserError (one line) where ome-zarr-models' ``ImageLabelAttrs`` refuses ``ome`` (about 1 ms; its first
    import about 0.2 s, so it is imported here, only by a process that creates a label image)."""
    from importlib import import_module

    from pydantic import ValidationError

    model = import_module(f"{version.models}.image_label").ImageLabelAttrs
    try:
        model.model_validate({**ome, "version": version.name} if version.zarr_format == 3 else ome)
    except ValidationError as err:
        first = err.errors()[0]
        at = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise UserError(f"{where} would not be valid OME-Zarr {version.name} ({at}: {message}): it copies the "
                        "image's axes and level transforms, so fix the image's metadata; nothing was written") from err


def create_labels(
    image: NgffImage,
    name: str,
    *,
    chunks: Sequence[int],
    run_id: str,
    dtype: Any = np.uint32,
) -> NgffImage:
    """Create the empty label image ``labels/<name>`` of ``image`` (opened writable), unlisted and marked
    incomplete: ``list_label`` makes it visible once it is written.

    The label image has the image's axes without ``c``, as many levels as the image (ome-zarr-models
    insists), the same physical transforms, and ``chunks`` (one per label axis) at every level. Its
    ``image-label`` metadata points back at the image (``label_metadata``, checked before anything is
    written). Arrays already at those paths are replaced; nothing else under ``labels/<name>`` (a work
    prefix) is touched.
    """
    ome = label_metadata(image, name)
    if np.dtype(dtype).kind not in "iu":
        raise ValueError("label images hold integers")
    keep = [i for i, a in enumerate(image.axes) if a != "c"]
    if len(chunks) != len(keep):
        raise ValueError(f"give one chunk size per label axis {[image.axes[i] for i in keep]}")
    version = image.version
    labels_group = image.group.require_group("labels")
    listed_labels(image.group, version)  # refuse a listing we could not extend later, before writing
    group = labels_group.require_group(name)
    names = [image.axes[i] for i in keep]
    for level in image.levels:
        shape = [level.shape[i] for i in keep]
        array_chunks = tuple(min(c, n) for c, n in zip(chunks, shape))
        group.create_array(
            level.path, shape=shape, dtype=dtype, chunks=array_chunks, fill_value=0, overwrite=True,
            **version.array_options(names),
        )
    group.attrs[RUN_MARKER] = {"complete": False, "run_id": run_id}
    version.write_ome(group, ome)
    return read_image(group)


def write_label_image(image: NgffImage, name: str, values: np.ndarray, *, chunks: Sequence[int],
                      run_id: str) -> NgffImage:
    """A whole label image written at once (level 0 from ``values``, the others built from it) and
    published: for data that fits in memory (synthetic and test slides, ground truth)."""
    labels = create_labels(image, name, chunks=chunks, run_id=run_id)
    labels.array(0)[:] = values
    pyramid.build_pyramid(labels.arrays(), "labels")
    publish_label(image, name)
    return labels


def publish_label(image: NgffImage, name: str) -> None:
    """Once every level of ``labels/<name>`` is written: mark it complete, then list it, so a reader
    never finds a listed label image that is not whole."""
    group = image.group["labels"][name]
    group.attrs[RUN_MARKER] = {**dict(group.attrs.get(RUN_MARKER) or {}), "complete": True}
    list_label(image, name)


def list_label(image: NgffImage, name: str) -> None:
    """Add ``name`` to the ``labels`` list, keeping every other entry (and refusing a malformed list)."""
    listed = list(listed_labels(image.group, image.version))
    if name not in listed:
        image.version.write_ome(image.group["labels"], {"labels": listed + [name]})


def unlist_label(image: NgffImage, name: str) -> None:
    """Take ``name`` off the ``labels`` list, keeping every other entry: readers stop finding it."""
    listed = list(listed_labels(image.group, image.version))
    if name in listed:
        image.version.write_ome(image.group["labels"], {"labels": [n for n in listed if n != name]})


def remove_label_arrays(image: NgffImage, name: str) -> None:
    """Delete the arrays of label image ``labels/<name>`` (each level its multiscales lists), unlisting it
    first; anything else in its folder stays."""
    unlist_label(image, name)
    group = image.group["labels"][name]
    ome = image.version.read_ome(group)
    paths = [ds.get("path") for ms in ome.get("multiscales") or [] if isinstance(ms, dict)
             for ds in ms.get("datasets") or [] if isinstance(ds, dict)]
    for path in paths:
        if isinstance(path, str) and path in group:
            del group[path]


def _create_levels(
    group: zarr.Group, version: NgffVersion, shape: Sequence[int], dtype: Any, chunks: Sequence[int],
    axes: Sequence[str], levels: int, scale: Sequence[float],
) -> list[dict[str, Any]]:
    datasets = []
    for k in range(levels):
        path = f"s{k}"
        lshape = level_shape(shape, axes, k)
        group.create_array(
            path, shape=lshape, dtype=dtype, chunks=tuple(min(c, n) for c, n in zip(chunks, lshape)),
            fill_value=0, **version.array_options(axes),
        )
        datasets.append({"path": path, "coordinateTransformations": level_transforms(scale, axes, k)})
    return datasets


def _omero(channels: Sequence[Channel], dtype: np.dtype) -> dict[str, Any]:
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    lo, hi = (float(info.min), float(info.max)) if info else (0.0, 1.0)
    out = []
    for ch in channels:
        start, end = ch.window or (lo, hi)
        out.append({
            "label": ch.name,
            "color": ch.color,
            "window": {"min": lo, "max": hi, "start": float(start), "end": float(end)},
            "active": True,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
        })
    return {"channels": out, "rdefs": {"model": "color"}}
