"""Slides as the ecosystem writes them, end to end on real parts (local Ray, moto S3, the ground-truth oracle).

Each fixture is made by the writer itself where it is a Python package (ome-zarr-py's ``write_image`` /
``write_labels``) or built to the published layout where it is not (bioformats2raw): odd sizes with
floor-halved pyramids, factor 3 and anisotropic pyramids, sharded zarr v3, uint8 / uint16 / int16 / float32
with NaN, no ``omero``, 42 channels with names repeated across cycles, a single-level image, brightfield
RGB. Every run must give the ground truth up to relabelling, label levels shaped and scaled as the image's,
output that ome-zarr-models validates and ome-zarr-py's ``Reader`` reads back with every level, and the
image's own bytes untouched. napari opens a run's output through napari-ome-zarr, whose reader is its own
(not ome-zarr-py's): it is tested on its own, headless, on a slide like the demo's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cellsam_ray.cli import main
from cellsam_ray.driver.api import segment
from cellsam_ray.io.ngff import open_image, open_labels
from cellsam_ray.testing.checks import array_checksums, label_chunk_files, same_up_to_relabelling, validate_ome_zarr
from cellsam_ray.testing.cluster import safe_ray_environment
from cellsam_ray.testing.ecosystem import (brightfield, disc_cells, fluorescence, write_bioformats2raw,
                                            write_with_ome_zarr_py)
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.s3 import spec_storage

ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"
TILING = dict(tile=256, halo=64, band=16, chunk=64)


def run_oracle(url, truth, tmp_path, storage_options=None, **spec):
    """Segment ``url`` with the oracle answering ``truth`` (a (y, x) array at the segmented level)."""
    path = tmp_path / f"truth-{spec.get('label_name', 'cells')}.npy"
    np.save(path, truth)
    values = dict(input=url, segmenter=ORACLE, segmenter_options=dict(labels=str(path)),
                  **spec_storage(storage_options), **{**TILING, **spec})
    return segment(values, progress=False)


def plane(array: np.ndarray, axes: tuple[str, ...]) -> np.ndarray:
    """The (y, x) plane of a label level (t = z = 0)."""
    return array[tuple(0 if a not in "yx" else slice(None) for a in axes)]


def check_labels(url, truth, storage_options=None, *, name="cells", level=0) -> np.ndarray:
    """The labels equal ``truth`` up to relabelling, mirror the image's levels, nest level by level and
    validate; returns the segmented level's plane."""
    image = open_image(url, storage_options)
    label = image.label(name)
    keep = [i for i, a in enumerate(image.axes) if a != "c"]
    assert [lv.shape for lv in label.levels] == [tuple(lv.shape[i] for i in keep) for lv in image.levels]
    assert [lv.scale for lv in label.levels] == [tuple(lv.scale[i] for i in keep) for lv in image.levels]
    cells = plane(np.asarray(label.array(level)[:]), label.axes)
    assert same_up_to_relabelling(cells, truth)
    for k in range(1, len(label.levels)):  # a coarser level only holds ids of the finer one
        finer, coarser = (np.unique(label.array(j)[:]) for j in (k - 1, k))
        assert set(coarser) <= set(finer) if k > level else set(finer) <= set(coarser)
    validate_ome_zarr(url, storage_options)
    return cells


def read_back_with_ome_zarr_py(url, version: str, image_levels: int, labels=("ground_truth", "cells")):
    """ome-zarr-py's Reader (the library's own, not napari-ome-zarr's) lists every label image, each with
    all its levels and its image-label metadata."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(url, fmt=FormatV04() if version == "0.4" else FormatV05()))())
    found = {n.zarr.path.rstrip("/").split("/")[-1]: n for n in nodes if n.load(Label)}
    assert set(labels) <= set(found)
    for name in labels:
        assert len(found[name].data) == image_levels
        assert "image-label" in found[name].zarr.root_attrs
    return found


# ----------------------------------------------------------------------------------- ome-zarr-py
@pytest.fixture(scope="module")
def floor_pyramid(tmp_path_factory):
    """ome-zarr-py 0.4 with its default pyramid (1/2 .. 1/16, floor: 601 → 300 → 150 → 75 → 37)."""
    truth = disc_cells((601, 803), seed=1)
    url = str(tmp_path_factory.mktemp("eco") / "floor.ome.zarr")
    write_with_ome_zarr_py(url, fluorescence(truth, 2, np.uint16, seed=1), version="0.4",
                           channel_names=["DAPI", "CD45"], chunks=(1, 128, 128), ground_truth=truth)
    return url, truth


def test_ome_zarr_py_default_floor_pyramid(floor_pyramid, ray_cluster, tmp_path):
    url, truth = floor_pyramid
    before = array_checksums(url)
    report = run_oracle(url, truth, tmp_path, nuclear=["DAPI"], whole_cell=["CD45"])
    assert [lv.shape[1:] for lv in open_image(url).levels] == [(601, 803), (300, 401), (150, 200), (75, 100),
                                                                (37, 50)]
    check_labels(url, truth)
    assert report["summary"]["cells"] == len(np.unique(truth)) - 1
    read_back_with_ome_zarr_py(url, "0.4", 5)
    assert array_checksums(url) == before


def test_a_coarser_level_segmented_fills_the_finer_floor_halved_one(floor_pyramid, ray_cluster, tmp_path):
    """Level 1 (300 × 401) segmented, level 0 (601 × 803) is built from it: each pixel takes the level-1
    pixel under its centre, and the row and column a floor-halving writer dropped repeat the last ones."""
    url, _ = floor_pyramid
    truth1 = np.asarray(open_image(url).label("ground_truth").array(1)[:])
    run_oracle(url, truth1, tmp_path, nuclear=["DAPI"], level=1, label_name="coarse",
               tile=128, halo=32, band=8, chunk=32)
    coarse = check_labels(url, truth1, name="coarse", level=1)
    level0 = np.asarray(open_image(url).label("coarse").array(0)[:])
    rows, cols = np.minimum(np.arange(601) // 2, 299), np.minimum(np.arange(803) // 2, 400)
    assert np.array_equal(level0, coarse[np.ix_(rows, cols)])


def test_sharded_v05_factor_three_uint8_on_s3(s3_prefix, storage_options, ray_cluster, tmp_path):
    """NGFF 0.5, sharded arrays (shards of 2×2 chunks), a factor-3 pyramid (301 → 100 → 33), uint8."""
    truth = disc_cells((301, 403), seed=2)
    url = f"{s3_prefix}/sharded.ome.zarr"
    write_with_ome_zarr_py(url, fluorescence(truth, 2, np.uint8, seed=2), version="0.5",
                           channel_names=["DAPI", "CD45"], chunks=(1, 64, 64), shards=(1, 128, 128),
                           scale_factors=[{"y": 3, "x": 3}, {"y": 9, "x": 9}], ground_truth=truth,
                           storage_options=storage_options)
    image = open_image(url, storage_options)
    assert image.array(0).shards == (1, 128, 128)
    assert [lv.shape[1:] for lv in image.levels] == [(301, 403), (100, 134), (33, 44)]
    before = array_checksums(url, storage_options)
    run_oracle(url, truth, tmp_path, storage_options, nuclear=["DAPI"], whole_cell=["CD45"],
               cell_table=False, qc_images=False)  # both are covered elsewhere; S3 runs are slow
    check_labels(url, truth, storage_options)
    read_back_with_ome_zarr_py(url, "0.5", 3)  # through AWS_ENDPOINT_URL, as ome-zarr-py opens s3:// itself
    assert array_checksums(url, storage_options) == before


def test_anisotropic_float32_with_nan_and_no_omero(tmp_path, ray_cluster):
    """x halved twice as fast as y, float32 pixels with NaN where nothing was scanned, no channel names:
    channels by index, NaN read as background, a cell table without NaN."""
    import pyarrow.parquet as pq

    truth = disc_cells((300, 512), seed=3)
    truth[:, 460:] = 0
    pixels = fluorescence(truth, 2, np.float32, seed=3)
    pixels[:, :, 470:] = np.nan  # the unscanned strip
    pixels[1, 10:14, :] = np.nan  # a dead line in one channel, across cells
    url = str(tmp_path / "aniso.ome.zarr")
    write_with_ome_zarr_py(url, pixels, version="0.5", chunks=(1, 64, 64),
                           scale_factors=[{"y": 2, "x": 4}, {"y": 4, "x": 16}], ground_truth=truth)
    image = open_image(url)
    assert image.channel_names == ()
    assert [lv.shape[1:] for lv in image.levels] == [(300, 512), (150, 128), (75, 32)]
    report = run_oracle(url, truth, tmp_path, nuclear=["0"], whole_cell=["1"])
    check_labels(url, truth)
    read_back_with_ome_zarr_py(url, "0.5", 3)
    table = pq.read_table(report["summary"]["cell_table"]).to_pandas()
    assert len(table) == len(np.unique(truth)) - 1 and np.isfinite(table.filter(like="mean_").to_numpy()).all()


# -------------------------------------------------------------------------------- bioformats2raw
def test_bioformats2raw_layout_on_s3_by_its_root(s3_prefix, storage_options, ray_cluster, tmp_path):
    """The root of a bioformats2raw conversion (5-D tczyx, "/" chunk keys, floor-halved levels, int16):
    the labels go into series 0, next to its levels, and nothing of the conversion is rewritten."""
    import fsspec

    truth = disc_cells((333, 415), seed=4)
    root = f"{s3_prefix}/slide.zarr"
    series = write_bioformats2raw(root, fluorescence(truth, 3, np.int16, seed=4), chunk=128,
                                  channel_names=["DAPI", "CD45", "PanCK"], storage_options=storage_options)
    image = open_image(root, storage_options)
    assert image.axes == ("t", "c", "z", "y", "x")
    assert [lv.shape[-2:] for lv in image.levels] == [(333, 415), (166, 207), (83, 103)]
    assert image.array(0).metadata.dimension_separator == "/"
    fs = fsspec.filesystem("s3", **storage_options)
    xml = fs.cat_file(f"{root[5:]}/OME/METADATA.ome.xml")
    before = array_checksums(root, storage_options)
    report = run_oracle(root, truth, tmp_path, storage_options, nuclear=["DAPI"],
                        whole_cell=["CD45", "PanCK"], cell_table=False, qc_images=False)
    assert report["summary"]["labels"] == f"{series}/labels/cells"
    check_labels(series, truth, storage_options)
    assert open_image(root, storage_options).label_names == ("cells",)  # the root names series 0
    assert array_checksums(series, storage_options) == before
    assert fs.cat_file(f"{root[5:]}/OME/METADATA.ome.xml") == xml
    assert not fs.exists(f"{root[5:]}/labels")


# ----------------------------------------------------------------------------- many channels, one level
@pytest.fixture(scope="module")
def cyclic(tmp_path_factory):
    """42 channels in 14 cycles of (DAPI, marker, marker), DAPI repeated in every cycle, one level only."""
    truth = disc_cells((300, 300), seed=5)
    names = [n for k in range(14) for n in ("DAPI", f"M{k}a", f"M{k}b")]
    url = str(tmp_path_factory.mktemp("cyclic") / "cyclic.ome.zarr")
    write_with_ome_zarr_py(url, fluorescence(truth, 42, np.uint16, seed=5), version="0.4", channel_names=names,
                           chunks=(1, 64, 64), scale_factors=[], ground_truth=truth)
    return url, truth


def test_repeated_channel_names_are_refused_with_their_indices(cyclic, capsys, monkeypatch):
    from cellsam_ray.cli import main

    monkeypatch.setattr("cellsam_ray.driver.api.ensure_ray", lambda: pytest.fail("reached Ray"))
    url, _ = cyclic
    assert main(["segment", url, "--nuclear", "DAPI", "--segmenter", ORACLE, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "nuclear channel 'DAPI' names 14 channels (indices 0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, ...)" in err
    assert "choose one or more by index, e.g. --nuclear 0" in err


def test_cyclic_immunofluorescence_single_level(cyclic, ray_cluster, tmp_path):
    """The second cycle's DAPI by index and a marker by name, from a single-level image (planning reads an
    overview chunk by chunk); the cell table has a column for each of the 42 channels."""
    import pyarrow.parquet as pq

    url, truth = cyclic
    assert len(open_image(url).levels) == 1
    report = run_oracle(url, truth, tmp_path, nuclear=["3"], whole_cell=["M1a"])
    check_labels(url, truth)
    read_back_with_ome_zarr_py(url, "0.4", 1)
    columns = pq.read_schema(report["summary"]["cell_table"]).names
    assert len([c for c in columns if c.startswith("mean_")]) == 42


# ------------------------------------------------------------------------------------- brightfield
def test_brightfield_rgb_end_to_end(tmp_path, ray_cluster):
    """An H&E-like RGB slide: no channels named, tissue found where the slide is darker than glass (the
    glass tiles are skipped), every nucleus in the tissue segmented."""
    yy, xx = np.mgrid[0:512, 0:640]
    tissue = (yy - 200) ** 2 / 170**2 + (xx - 220) ** 2 / 200**2 < 1
    truth = disc_cells((512, 640), seed=6, where=tissue)
    url = str(tmp_path / "he.ome.zarr")
    write_with_ome_zarr_py(url, brightfield(truth, tissue, seed=6), version="0.5", channel_names=["R", "G", "B"],
                           chunks=(1, 128, 128), ground_truth=truth)
    before = array_checksums(url)
    report = run_oracle(url, truth, tmp_path, stain="brightfield", tile=128, halo=32, band=8)
    assert report["summary"]["tiles_skipped_no_tissue"] >= 4
    check_labels(url, truth)
    read_back_with_ome_zarr_py(url, "0.5", len(open_image(url).levels))
    assert array_checksums(url) == before


def test_the_oracle_keeps_its_first_public_name_and_variable(floor_pyramid, ray_cluster):
    """``cellsam_ray.oracle:GroundTruthSegmenter`` on an ome-zarr-py slide from the command line, its cells
    named as specs first named them (``CELLSAM_RAY_ORACLE_LABELS``, read by every process of the run) and
    as they are named now (``--segmenter-option labels=``): the same labels."""
    url, truth = floor_pyramid
    before = array_checksums(url)
    argv = [sys.executable, "-m", "cellsam_ray.cli", "segment", url, "--nuclear", "DAPI", "--whole-cell", "CD45",
            "--segmenter", "cellsam_ray.oracle:GroundTruthSegmenter", "--no-progress",
            *[f"--{name}={value}" for name, value in TILING.items()]]
    # Its own local cluster, whose processes all have the variable (the session's started without it).
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **safe_ray_environment(),
           "CELLSAM_RAY_ORACLE_LABELS": url}
    done = subprocess.run([*argv, "--label-name", "by-variable"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert main([*argv[3:], "--label-name", "by-option", "--segmenter-option", f"labels={url}"]) == 0
    assert same_up_to_relabelling(check_labels(url, truth, name="by-variable"), truth)
    assert label_chunk_files(url, "by-variable") == label_chunk_files(url, "by-option")
    assert array_checksums(url) == before


# ------------------------------------------------------------------------------------------ napari
@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_napari_ome_zarr_opens_the_image_and_every_level_of_the_labels(ngff, tmp_path, ray_cluster):
    """napari-ome-zarr's reader, headless (no Qt, no viewer), on a segmented slide like the demo's (4
    channels, 2 levels): one image layer per channel with every level, and ``labels/cells`` as a labels
    layer with every level, in the image's scale and place."""
    url = str(tmp_path / "slide.ome.zarr")
    write_synthetic_slide(url, size=(512, 512), channels=4, ngff=ngff, seed=8, chunk=256)
    segment(dict(input=url, nuclear=["DAPI"], whole_cell=["1"], segmenter=ORACLE, segmenter_options=dict(labels=url),
                 cell_table=False, qc_images=False, **TILING), progress=False)
    from napari_ome_zarr._reader import napari_get_reader

    assert not {"PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy"} & set(sys.modules)  # a reader, not a viewer
    (data, meta, kind), *labels = napari_get_reader(url)()  # the image layers first, then each label image
    image, cells = open_image(url), open_labels(url)
    assert len(image.levels) == 2
    assert kind == "image" and meta["channel_axis"] == 0
    assert meta["name"] == [f"{image.name}: {c}" for c in image.channel_names]
    assert [d.shape for d in data] == [lv.shape for lv in image.levels]
    yx = meta["scale"]
    assert yx == list(image.levels[0].scale[1:])
    for k, level in enumerate(image.levels):  # napari scales a level by its shape: the metadata must agree
        assert [s * n / m for s, n, m in zip(yx, data[0].shape[1:], data[k].shape[1:])] == list(level.scale[1:])

    found = {m["name"].split("/")[-1]: (d, m) for d, m, k in labels if k == "labels"}
    assert len(labels) == len(found) and set(found) == {"cells", "ground_truth"}
    label_data, label_meta = found["cells"]
    assert [d.shape for d in label_data] == [d.shape[1:] for d in data]
    assert label_meta["scale"] == yx and label_meta["axis_labels"] == meta["axis_labels"] == ("y", "x")
    assert np.array_equal(label_meta["affine"].affine_matrix, meta["affine"].affine_matrix)
    for k, level in enumerate(label_data):
        assert np.array_equal(level.compute(), cells.array(k)[:])
    assert label_data[0].max().compute() > 0
