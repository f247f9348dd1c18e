"""NGFF versions, creating images and label images, and reading them back; validated by ome-zarr-models.
The last tests hold the reasons notes/ngff.md gives for what is still written here rather than by
ome-zarr-py."""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
from importlib import import_module

import numpy as np
import pytest
import zarr
from pydantic import BaseModel

from cellsam_ray.errors import UserError
from cellsam_ray.io import ngff
from cellsam_ray.io.storage import open_group, open_store
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import InvalidOmeZarr, validate_ome_zarr

CHANNELS = [ngff.Channel("DAPI", "0000FF", (100, 2000)), ngff.Channel("CD45", "FFFF00")]


def make_image(url, version, storage_options=None, shape=(2, 300, 260), levels=3):
    return ngff.create_image(
        url, shape=shape, dtype=np.uint16, chunks=(1, 128, 128), axes=ngff.image_axes("cyx"),
        scale=(1.0, 0.5, 0.5), levels=levels, version=version, channels=CHANNELS,
        storage_options=storage_options,
    )


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_image_and_labels_roundtrip_locally(tmp_path, version):
    url = str(tmp_path / "img.zarr")
    image = make_image(url, version)
    image.array(0)[:] = 7
    labels = ngff.create_labels(image, "cells", chunks=(64, 64), run_id="test")
    assert labels.axes == ("y", "x") and len(labels.levels) == 3
    ngff.create_labels(image, "nuclei", chunks=(64, 64), run_id="test")
    assert ngff.open_image(url).label_names == ()  # not listed until written
    ngff.publish_label(image, "cells")
    ngff.publish_label(image, "nuclei")

    back = ngff.open_image(url)
    assert back.version is ngff.ngff_version(version)
    assert back.group.metadata.zarr_format == back.version.zarr_format
    assert back.axes == ("c", "y", "x")
    assert back.axis_types == ("channel", "space", "space")
    assert back.axis_units == (None, "micrometer", "micrometer")
    assert back.channel_names == ("DAPI", "CD45")
    assert back.label_names == ("cells", "nuclei")
    assert [lv.shape for lv in back.levels] == [(2, 300, 260), (2, 150, 130), (2, 75, 65)]
    assert [lv.chunks for lv in back.levels] == [(1, 128, 128), (1, 128, 128), (1, 75, 65)]
    assert [lv.scale for lv in back.levels] == [(1, 0.5, 0.5), (1, 1, 1), (1, 2, 2)]
    # Level k pixels average 2**k level-0 pixels: their centres sit half a coarse pixel in.
    assert [lv.translation for lv in back.levels] == [(0, 0, 0), (0, 0.25, 0.25), (0, 0.75, 0.75)]
    assert back.levels[0].dtype == np.uint16
    assert int(back.array(0)[1, 299, 259]) == 7

    cells = back.label("cells")
    assert [lv.shape for lv in cells.levels] == [(300, 260), (150, 130), (75, 65)]
    assert [lv.scale for lv in cells.levels] == [(0.5, 0.5), (1, 1), (2, 2)]
    assert cells.levels[0].dtype == np.uint32 and cells.levels[0].chunks == (64, 64)
    label_ome = back.version.read_ome(cells.group)
    assert label_ome["image-label"]["source"]["image"] == "../../"
    if version == "0.5":
        assert cells.array(0).metadata.dimension_names == ("y", "x")
        assert back.array(0).metadata.dimension_names == ("c", "y", "x")
        assert back.group["labels"].attrs["ome"]["version"] == "0.5"  # stack.md 4.4
    else:
        assert back.array(0).metadata.dimension_separator == "/"

    omero = back.version.read_ome(back.group)["omero"]["channels"]
    assert omero[0]["window"] == {"min": 0, "max": 65535, "start": 100, "end": 2000}
    assert omero[0]["color"] == "0000FF"

    model = validate_ome_zarr(url)
    assert type(model).__module__.startswith(f"ome_zarr_models.v0{version[-1]}")
    validate_ome_zarr(cells.group)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_image_on_s3_validates(s3_prefix, storage_options, version):
    image = make_image(s3_prefix, version, storage_options)
    ngff.create_labels(image, "cells", chunks=(128, 128), run_id="test")
    ngff.publish_label(image, "cells")
    validate_ome_zarr(s3_prefix, storage_options)
    assert ngff.open_image(s3_prefix, storage_options).label_names == ("cells",)


class ChunkReads(logging.Handler):
    """The chunk keys a zarr ``LoggingStore`` is asked for (metadata left out)."""

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record):
        read = re.fullmatch(r" Calling \w+\.get\((.+)\)", record.getMessage())
        if read and not read[1].endswith(("zarr.json", ".zattrs", ".zarray", ".zgroup", ".zmetadata")):
            self.keys.append(read[1])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_levels_as_lazy_dask_arrays_on_s3(s3_prefix, storage_options, version):
    """``open_labels(url).dask_levels()``: every level as stored, no chunk read until computed, then the
    zarr arrays' values, each chunk read once."""
    write_synthetic_slide(s3_prefix, size=(384, 320), channels=2, chunk=128, ngff=version,
                          storage_options=storage_options)
    labels = ngff.open_labels(s3_prefix, "ground_truth", storage_options)
    levels = labels.dask_levels()
    assert [(a.shape, a.chunksize, a.dtype) for a in levels] == [(lv.shape, lv.chunks, lv.dtype) for lv in labels.levels]
    assert len(levels) == 2 and levels[0].numblocks == (3, 3)

    store = zarr.storage.LoggingStore(open_store(s3_prefix, storage_options, read_only=True),
                                      log_handler=logging.NullHandler())
    reads = ChunkReads()
    store.logger.addHandler(reads)
    try:
        lazy = ngff.open_image(zarr.open_group(store, mode="r")).label("ground_truth").dask_levels()
        assert reads.keys == []
        for k, values in enumerate(labels.arrays()):
            assert np.array_equal(lazy[k].compute(), values[:]) and np.array_equal(levels[k].compute(), values[:])
        assert sorted(reads.keys) == sorted(set(reads.keys))
        assert len(reads.keys) == sum(math.prod(a.numblocks) for a in lazy)
    finally:
        store.logger.removeHandler(reads)


def test_the_module_leaves_dask_unimported():
    """dask is imported by ``dask_levels`` alone: opening an image does not pay for it."""
    code = "import sys, cellsam_ray.io.ngff; assert 'dask' not in sys.modules, 'dask imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_label_name_rules(tmp_path):
    image = make_image(str(tmp_path / "img.zarr"), "0.5")
    ngff.create_labels(image, "cells", chunks=(64, 64), run_id="test")
    relabelled = ngff.create_labels(image, "cells", chunks=(32, 32), run_id="test")  # arrays replaced
    assert relabelled.levels[0].chunks == (32, 32)
    with pytest.raises(UserError, match="invalid label name"):
        ngff.create_labels(image, "a/b", chunks=(64, 64), run_id="test")
    with pytest.raises(UserError, match="no label image"):
        ngff.open_image(str(tmp_path / "img.zarr")).label("nuclei")


def test_a_label_image_is_found_only_once_it_is_published(tmp_path):
    url = str(tmp_path / "img.zarr")
    image = make_image(url, "0.4")
    ngff.create_labels(image, "cells", chunks=(64, 64), run_id="r1")
    with pytest.raises(UserError, match="incomplete"):
        ngff.open_image(url).label("cells")
    assert ngff.open_image(url).label("cells", complete=False).levels[0].shape == (300, 260)
    ngff.publish_label(image, "cells")
    assert ngff.open_image(url).label("cells").group.attrs["cellsam_ray"] == {"complete": True, "run_id": "r1"}
    validate_ome_zarr(url)  # the marker is an extra attribute the validator accepts
    # Listed but marked unfinished (a listing that predates the marker): still refused.
    open_group(url, mode="r+")["labels/cells"].attrs["cellsam_ray"] = {"complete": False, "run_id": "r2"}
    with pytest.raises(UserError, match="incomplete"):
        ngff.open_image(url).label("cells")


@pytest.mark.parametrize("listing", ["cells", ["cells", 3], {"cells": 1}])
def test_a_malformed_labels_list_is_refused_and_left_unchanged(tmp_path, listing):
    url = str(tmp_path / "img.zarr")
    image = make_image(url, "0.4")
    ngff.create_labels(image, "cells", chunks=(64, 64), run_id="test")
    open_group(url, mode="r+")["labels"].attrs["labels"] = listing
    before = (tmp_path / "img.zarr" / "labels" / ".zattrs").read_bytes()
    with pytest.raises(UserError, match="malformed 'labels' list"):
        ngff.open_image(url).label("cells")
    assert ngff.open_image(url).label_names == ()  # the image itself still opens, for its pixels
    with pytest.raises(UserError, match="malformed 'labels' list"):
        ngff.list_label(image, "cells")
    assert (tmp_path / "img.zarr" / "labels" / ".zattrs").read_bytes() == before


def test_validator_catches_a_label_pyramid_shorter_than_its_image(tmp_path):
    url = str(tmp_path / "img.zarr")
    image = make_image(url, "0.5")
    ngff.create_labels(image, "cells", chunks=(64, 64), run_id="test")
    ngff.publish_label(image, "cells")
    group = open_group(url, mode="r+")
    ome = dict(group["labels/cells"].attrs["ome"])
    ome["multiscales"][0]["datasets"] = ome["multiscales"][0]["datasets"][:1]
    group["labels/cells"].attrs["ome"] = ome
    with pytest.raises(InvalidOmeZarr, match="levels"):
        validate_ome_zarr(url)


def test_not_ome_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    group.create_array("a", shape=(2,), dtype="u1")
    with pytest.raises(UserError, match="not an OME-Zarr image"):
        ngff.open_image(str(tmp_path / "plain.zarr"))
    with pytest.raises(UserError, match="does not exist"):
        ngff.open_image(str(tmp_path / "missing.zarr"))
    old = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=2)
    old.attrs["multiscales"] = [{"version": "0.3", "axes": ["y", "x"], "datasets": [{"path": "0"}]}]
    with pytest.raises(UserError, match="OME-Zarr 0.3"):
        ngff.open_image(str(tmp_path / "old.zarr"))


def test_versions():
    assert ngff.ngff_version("0.4").zarr_format == 2
    assert ngff.ngff_version("0.5").zarr_format == 3
    assert ngff.ngff_version(ngff.V05) is ngff.V05
    with pytest.raises(UserError, match="unsupported NGFF version '0.6'"):
        ngff.ngff_version("0.6")


def test_global_transforms_compose(tmp_path):
    """A multiscale-wide scale/translation applies after each dataset's own (NGFF 0.4/0.5)."""
    url = str(tmp_path / "img.zarr")
    make_image(url, "0.4", levels=2)
    group = open_group(url, mode="r+")
    ms = group.attrs["multiscales"]
    ms[0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [1, 2, 2]}, {"type": "translation", "translation": [0, 10, 20]}]
    group.attrs["multiscales"] = ms
    level = ngff.open_image(url).levels[1]
    assert level.scale == (1, 2, 2)
    assert level.translation == (0, 10.5, 20.5)


def test_pyramid_geometry():
    assert ngff.count_levels((2048, 2048), chunk=512) == 3  # 2048, 1024, 512 (one chunk)
    assert ngff.count_levels((1000, 3000), chunk=128) == 5  # ... 375 -> 188 <= 256
    assert ngff.count_levels((100, 100), chunk=512) == 1
    assert ngff.level_shape((3, 5, 301, 7), ("c", "z", "y", "x"), 2) == (3, 5, 76, 2)
    with pytest.raises(ValueError):
        ngff.image_axes("cyy")


def extra_keys(value):
    """The keys of a parsed ome-zarr-models tree that no model field names (kept as extras)."""
    if isinstance(value, BaseModel):
        yield from value.model_extra or {}
        for field in type(value).model_fields:
            yield from extra_keys(getattr(value, field))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from extra_keys(item)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_label_metadata_is_what_ome_zarr_models_reads_and_writes(tmp_path, version):
    """Each key we write is a field of ome-zarr-models (a misspelt optional key would be kept as an extra),
    and the models write back exactly what we wrote."""
    image = make_image(str(tmp_path / "img.zarr"), version)
    labels = ngff.create_labels(image, "cells", chunks=(64, 64), run_id="test")
    ome = {k: v for k, v in image.version.read_ome(labels.group).items() if k != ngff.RUN_MARKER}
    assert ome == ngff.label_metadata(image, "cells") | ({"version": "0.5"} if version == "0.5" else {})
    model = import_module(f"{image.version.models}.image_label").ImageLabelAttrs.model_validate(ome)
    assert model.model_dump(by_alias=True, exclude_none=True, mode="json") == ome
    assert list(extra_keys(model)) == []


def untyped_axes(ome):
    ome["multiscales"][0]["axes"] = [{"name": a["name"]} for a in ome["multiscales"][0]["axes"]]


def coarsest_first(ome):
    ome["multiscales"][0]["datasets"] = ome["multiscales"][0]["datasets"][::-1]


def test_an_image_with_untyped_axes_gets_a_label_with_typed_ones(tmp_path):
    """NGFF 0.4 lets an image leave its axes untyped; its label takes the types the names say, and validates."""
    url = str(tmp_path / "img.zarr")
    make_image(url, "0.4")
    group = open_group(url, mode="r+")
    ome = ngff.ngff_version("0.4").read_ome(group)
    untyped_axes(ome)
    ngff.ngff_version("0.4").write_ome(group, ome)
    image = ngff.open_image(url, mode="r+")
    assert image.axis_types == (None, None, None)
    labels = ngff.create_labels(image, "cells", chunks=(64, 64), run_id="test")
    axes = ngff.ngff_version("0.4").read_ome(labels.group)["multiscales"][0]["axes"]
    assert [(a["name"], a["type"]) for a in axes] == [("y", "space"), ("x", "space")]


@pytest.mark.parametrize("version, edit, problem", [
    ("0.5", coarsest_first, "(multiscales.0.datasets: Dataset 0 has a lower resolution (scales = [2.0, 2.0])"),
])
def test_a_label_ome_zarr_models_would_refuse_is_refused_before_anything_is_written(tmp_path, version, edit, problem):
    """Our reader takes these images; a label copying their axes and transforms would be invalid NGFF."""
    url = str(tmp_path / "img.zarr")
    make_image(url, version)
    group = open_group(url, mode="r+")
    ome = ngff.ngff_version(version).read_ome(group)
    edit(ome)
    ngff.ngff_version(version).write_ome(group, ome)
    image = ngff.open_image(url, mode="r+")
    with pytest.raises(UserError, match="would not be valid OME-Zarr") as refused:
        ngff.create_labels(image, "cells", chunks=(64, 64), run_id="test")
    assert f"labels/cells would not be valid OME-Zarr {version} {problem}" in str(refused.value)
    assert "\n" not in str(refused.value) and "labels" not in open_group(url)



@pytest.mark.parametrize("writer, version, options", [
    ("ome-zarr-py", "0.4", {}),  # its default floor-halved pyramid: 301 x 403 -> 150 x 201 -> ...
    ("ome-zarr-py", "0.5", dict(shards=(1, 128, 128), scale_factors=[{"y": 3, "x": 3}, {"y": 9, "x": 9}])),
    ("ome-zarr-py", "0.5", dict(scale_factors=[{"y": 2, "x": 4}, {"y": 4, "x": 16}])),  # anisotropic
    ("bioformats2raw", "0.4", {}),  # tczyx, t = z = 1
])
def test_labels_in_images_others_wrote_pass_the_check_and_validate(tmp_path, writer, version, options):
    from cellsam_ray.testing.ecosystem import write_bioformats2raw, write_with_ome_zarr_py

    pixels = np.zeros((2, 301, 403), np.uint16)
    url = str(tmp_path / "slide.ome.zarr")
    if writer == "bioformats2raw":
        url = write_bioformats2raw(url, pixels, channel_names=["DAPI", "CD45"], chunk=64, levels=3)
    else:
        write_with_ome_zarr_py(url, pixels, version=version, chunks=(1, 64, 64), **options)
    image = ngff.open_image(url, mode="r+")
    chunks = [64 if a in "yx" else 1 for a in image.axes if a != "c"]
    labels = ngff.create_labels(image, "cells", chunks=chunks, run_id="test")
    ngff.publish_label(image, "cells")
    assert [lv.scale for lv in labels.levels] == [tuple(s for s, a in zip(lv.scale, image.axes) if a != "c")
                                                  for lv in image.levels]
    validate_ome_zarr(url)

def test_reading_a_slide_imports_neither_ome_zarr_py_nor_dask():
    """Why our version objects keep two of ome-zarr-py's constants instead of importing its formats: its
    package imports dask and its own classes, about 0.6 s in every process that reads a slide (notes/ngff.md)."""
    code = "import sys, cellsam_ray.io.ngff; print(sorted({'ome_zarr', 'ome_zarr_models', 'dask'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_reasons_ome_zarr_py_writes_none_of_our_metadata_still_hold(tmp_path):
    """notes/ngff.md, as ome-zarr-py 0.18 behaves; should this fail after an upgrade, see whether its writer
    functions can now replace ours."""
    from ome_zarr import writer
    from ome_zarr.format import FormatV04, FormatV05, detect_format

    # Our version constants are its formats' (kept here so that reading does not import it).
    images = {}
    for ours, theirs in ((ngff.V04, FormatV04()), (ngff.V05, FormatV05())):
        assert (ours.name, ours.zarr_format) == (theirs.version, theirs.zarr_format)
        image = images[ours.name] = make_image(str(tmp_path / f"{ours.name}.zarr"), ours.name)
        encoding = image.array(0).metadata.chunk_key_encoding if ours is ngff.V05 else None
        separator = encoding.separator if encoding else image.array(0).metadata.dimension_separator
        assert separator == theirs.chunk_key_encoding["separator"]
        assert encoding is None or encoding.name == theirs.chunk_key_encoding["name"]
        ngff.create_labels(image, "cells", chunks=(64, 64), run_id="test")
        ngff.publish_label(image, "cells")
    # It detects a version by multiscales[0].version: 0.5 has none there, nor has a 0.4 labels group.
    assert detect_format(ngff.V05.read_ome(images["0.5"].group), None) is None
    assert detect_format(ngff.V04.read_ome(open_group(str(tmp_path / "0.4.zarr"))["labels"]), None) is None
    # Its transforms come from the shapes alone: a floor-halved 1001 -> 500 pyramid gets scale 2.002.
    assert FormatV04().generate_coordinate_transformations([(1001,), (500,)])[1][0]["scale"] == [2.002]
    # write_multiscales_metadata drops the multiscale's type ("mode": how labels were downsampled).
    labels = open_group(str(tmp_path / "0.5.zarr"), mode="r+")["labels/cells"]
    ms = ngff.V05.read_ome(labels)["multiscales"][0]
    writer.write_multiscales_metadata(labels, ms["datasets"], fmt=FormatV05(), axes=ms["axes"], name="cells",
                                      type="mode")
    assert "type" not in ngff.V05.read_ome(open_group(str(tmp_path / "0.5.zarr"))["labels/cells"])["multiscales"][0]
    # write_label_metadata lists a label as it writes its metadata (before its pixels), again on a rerun, and
    # leaves a new 0.5 labels group without ome.version.
    root = zarr.open_group(str(tmp_path / "fresh.zarr"), mode="w", zarr_format=3)
    root.require_group("labels").require_group("cells")
    for _ in range(2):
        writer.write_label_metadata(root["labels"], "cells", fmt=FormatV05())
    listing = dict(zarr.open_group(str(tmp_path / "fresh.zarr"))["labels"].attrs)
    assert listing == {"ome": {"labels": ["cells", "cells"]}}
