"""Synthetic tissue slides: valid OME-Zarr locally and on S3, deterministic, chunk-invariant, tissue-like
ground truth, bounded memory, and the ``cellsam-ray synth`` command."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cellsam_ray.cli import main
from cellsam_ray.errors import UserError
from cellsam_ray.io.ngff import count_levels, open_image
from cellsam_ray.synth import LABEL_NAME, TissueModel, write_synthetic_slide
from cellsam_ray.synth.cells import MAX_RADIUS, MAX_WARP
from cellsam_ray.synth.tissue import OFFSET
from cellsam_ray.testing.checks import validate_ome_zarr

SIZE = (384, 512)


def read_level0(url, storage_options=None):
    image = open_image(url, storage_options)
    return image.array(0)[:], image.label(LABEL_NAME).array(0)[:]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ OME-Zarr
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_local_slide_is_valid_ngff(tmp_path, version):
    url = str(tmp_path / "slide.ome.zarr")
    info = write_synthetic_slide(url, size=SIZE, channels=3, ngff=version, seed=1, chunk=128, pixel_size=0.65)
    model = validate_ome_zarr(url)
    assert model.labels is not None  # the validator saw (and checked) labels/
    image = open_image(url)
    assert image.version.name == version and info.ngff == version
    assert image.axes == ("c", "y", "x") and image.axis_units == (None, "micrometer", "micrometer")
    assert image.channel_names == ("DAPI", "E-cadherin", "Pan-Cytokeratin") == info.channel_names
    assert len(image.levels) == info.levels == count_levels(SIZE, 128) == 2
    assert image.levels[0].shape == (3, *SIZE) and image.levels[0].dtype == np.uint16
    assert image.levels[0].chunks == (1, 128, 128)
    assert image.levels[1].scale == (1.0, 1.3, 1.3)
    labels = image.label(LABEL_NAME)
    assert len(labels.levels) == len(image.levels)
    assert labels.levels[0].dtype == np.uint32 and labels.levels[0].shape == SIZE


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_s3_slide_is_valid_and_readable_by_ome_zarr_py(s3_prefix, storage_options, tmp_path, version):
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    url = f"{s3_prefix}/slide.ome.zarr"
    write_synthetic_slide(url, size=(256, 320), channels=2, ngff=version, seed=2, chunk=128,
                          storage_options=storage_options)
    validate_ome_zarr(url, storage_options)
    # The same slide written locally has the same pixels: storage does not change the data.
    write_synthetic_slide(str(tmp_path / "local.zarr"), size=(256, 320), channels=2, ngff=version, seed=2, chunk=128)
    for remote, local in zip(read_level0(url, storage_options), read_level0(str(tmp_path / "local.zarr"))):
        np.testing.assert_array_equal(remote, local)

    # ome-zarr-py builds its own S3 client from the bare URL: AWS_ENDPOINT_URL (set by conftest) routes it.
    assert os.environ["AWS_ENDPOINT_URL"] == storage_options["endpoint_url"]
    location = parse_url(url, fmt=FormatV04() if version == "0.4" else FormatV05())
    assert location is not None
    nodes = list(Reader(location)())
    image_nodes = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
    label_nodes = [n for n in nodes if n.load(Label)]
    assert len(image_nodes) == 1 and len(label_nodes) == 1
    assert image_nodes[0].data[0].shape == (2, 256, 320)
    assert label_nodes[0].data[0].shape == (256, 320)
    assert int(np.asarray(label_nodes[0].data[0]).max()) > 0


def test_any_fsspec_url():
    url = "memory://synth-test/slide.ome.zarr"
    write_synthetic_slide(url, size=(96, 80), channels=1, chunk=32)
    validate_ome_zarr(url)
    assert open_image(url).levels[0].shape == (1, 96, 80)


# ------------------------------------------------------------------------------- determinism & chunks
def test_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        write_synthetic_slide(str(tmp_path / name), size=(256, 256), channels=2, seed=seed, chunk=128)
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert a == b and len(a) > 10
    pixels_a, labels_a = read_level0(str(tmp_path / "a"))
    pixels_c, labels_c = read_level0(str(tmp_path / "c"))
    assert (pixels_a != pixels_c).mean() > 0.5
    assert (labels_a != labels_c).mean() > 0.2


def test_threads_write_the_same_bytes(tmp_path):
    write_synthetic_slide(str(tmp_path / "one"), size=(256, 256), channels=2, seed=6, chunk=64, workers=1)
    write_synthetic_slide(str(tmp_path / "two"), size=(256, 256), channels=2, seed=6, chunk=64, workers=2)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_level0_does_not_depend_on_chunking(tmp_path):
    """Cells crossing chunk borders, blur, noise and ids are functions of global coordinates only."""
    results = []
    for chunk in (256, 512, 100):  # 100: chunks not aligned to anything in the model
        url = str(tmp_path / f"c{chunk}")
        write_synthetic_slide(url, size=(560, 600), channels=3, seed=7, chunk=chunk)
        results.append(read_level0(url))
    assert results[0][1].max() > 0
    for pixels, labels in results[1:]:
        np.testing.assert_array_equal(pixels, results[0][0])
        np.testing.assert_array_equal(labels, results[0][1])
    # And a region rendered on its own matches the slide.
    region = TissueModel((560, 600), seed=7, channels=3).render(37, 161, 250, 420)
    np.testing.assert_array_equal(region.image, results[0][0][:, 37:161, 250:420])
    np.testing.assert_array_equal(region.labels, results[0][1][37:161, 250:420])


# ------------------------------------------------------------------------------------- ground truth
@pytest.fixture(scope="module")
def truth():
    """A 1024² slide's level 0, rendered in one piece (the same as written, by chunk invariance)."""
    return TissueModel((1024, 1024), seed=11, channels=8).render(0, 1024, 0, 1024)


def interior_cells(labels):
    """Ids of cells that do not touch the slide border, with their pixel counts."""
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    keep = ~np.isin(ids, edge)
    return ids[keep], counts[keep]


def test_cells_have_tissue_like_sizes(truth):
    ids, counts = interior_cells(truth.labels)
    assert len(ids) > 500
    diameters = np.sqrt(4 * counts / np.pi)
    assert np.mean((diameters >= 8) & (diameters <= 40)) > 0.95
    assert 12 < np.median(diameters) < 30
    assert np.percentile(diameters, 90) / np.percentile(diameters, 10) > 1.5  # varied, not a grid


def test_ids_are_unique_cells(truth):
    ids, _ = interior_cells(truth.labels)
    slices = ndimage.find_objects(truth.labels)
    split = 0
    for cell_id in ids:
        box = slices[cell_id - 1]
        _, n = ndimage.label(truth.labels[box] == cell_id)
        split += n > 1
    assert split / len(ids) < 0.01  # an id is one connected cell (rare warped slivers aside)
    assert truth.labels.dtype == np.uint32


def test_nuclei_lie_inside_their_cells(truth):
    assert not (truth.nuclei & (truth.labels == 0)).any()
    ids, counts = interior_cells(truth.labels)
    nucleus_pixels = ndimage.sum_labels(truth.nuclei, truth.labels, ids)
    with_nucleus = nucleus_pixels > 0
    assert with_nucleus.mean() > 0.97
    fraction = nucleus_pixels[with_nucleus] / counts[with_nucleus]
    assert 0.1 < np.median(fraction) < 0.5  # nuclei are smaller than cells
    # Each cell's nucleus is one blob: the number of nucleus components equals the number of cells with one.
    _, n_blobs = ndimage.label(truth.nuclei)
    assert abs(n_blobs - with_nucleus.sum()) / with_nucleus.sum() < 0.1


def test_background_has_no_cells_and_no_signal(truth):
    labelled = truth.labels > 0
    assert 0.1 < 1 - labelled.mean() < 0.8  # there is empty background, and tissue
    # Cells grow only from centres in tissue, so none reaches farther than a cell radius (plus warp) out.
    distance_to_tissue = ndimage.distance_transform_edt(~truth.tissue)
    assert distance_to_tissue[labelled].max() <= MAX_RADIUS + MAX_WARP + 1
    far = distance_to_tissue > 40
    assert far.mean() > 0.05
    assert abs(truth.image[:, far].mean() - OFFSET) < 5  # only detector offset and noise there


def test_channels_stain_their_compartments(truth):
    image, labels = truth.image.astype(np.float64), truth.labels
    dapi, membrane, cytoplasm = image[0], image[1], image[2]
    cell = labels > 0
    border = cell & (ndimage.grey_dilation(labels, size=3) != ndimage.grey_erosion(labels, size=3))
    inside = cell & ~border & ~truth.nuclei
    assert dapi[truth.nuclei].mean() > 2 * dapi[inside].mean()
    assert membrane[border].mean() > 1.5 * membrane[inside].mean()
    assert cytoplasm[inside].mean() > 1.5 * cytoplasm[truth.nuclei].mean()
    # Markers stain subsets: Pan-Cytokeratin-positive cells are a minority or majority, never all or none.
    ids, _ = interior_cells(labels)
    per_cell = ndimage.mean(cytoplasm, labels, ids)
    positive = per_cell > OFFSET + 300
    assert 0.05 < positive.mean() < 0.95
    # Every channel has its own pattern.
    flat = image.reshape(len(image), -1)
    corr = np.corrcoef(flat)
    assert (np.abs(corr[np.triu_indices(len(image), 1)]) < 0.95).all()


def test_illumination_is_uneven():
    """The same stain is brighter in some parts of a large slide than in others (low-frequency field)."""
    model = TissueModel((4096, 4096), seed=3, channels=1)
    ratios = []
    for y, x in ((0, 0), (0, 3840), (3840, 0), (3840, 3840), (1920, 1920)):
        region = model.render(y, y + 256, x, x + 256)
        if region.nuclei.sum() > 500:
            ratios.append((region.image[0][region.nuclei].astype(float) - OFFSET).mean())
    assert len(ratios) >= 2 and max(ratios) / min(ratios) > 1.3


def test_many_channels_have_distinct_names():
    model = TissueModel((64, 64), seed=0, channels=14)
    names = [m.name for m in model.markers]
    assert names[:4] == ["DAPI", "E-cadherin", "Pan-Cytokeratin", "CD45"]
    assert names[-2:] == ["Marker-13", "Marker-14"] and len(set(names)) == 14
    assert len({m.color for m in model.markers}) == 14


# ------------------------------------------------------------------------------------------- memory
def traced_peak(path, size, chunk):
    tracemalloc.start()
    try:
        write_synthetic_slide(str(path), size=(size, size), channels=3, seed=0, chunk=chunk)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_chunk_not_the_slide(tmp_path):
    small = traced_peak(tmp_path / "small", 256, 128)
    large = traced_peak(tmp_path / "large", 1024, 128)  # 16x the pixels
    assert large < 1.5 * small
    assert large < 40 * 2**20


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, message", [
    ({"size": (0, 100)}, "size must be positive"),
    ({"size": (100, -5)}, "size must be positive"),
    ({"size": (100,)}, "two integers"),
    ({"ngff": "0.3"}, "unsupported NGFF version"),
    ({"channels": 0}, "channels must be"),
    ({"chunk": 8}, "chunk must be"),
    ({"pixel_size": 0}, "pixel size"),
    ({"seed": -1}, "seed"),
    ({"size": (10**6, 10**6)}, "too large for uint32 cell ids"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        write_synthetic_slide(str(tmp_path / "x.zarr"), **{"size": (64, 64), **kwargs})
    assert not (tmp_path / "x.zarr").exists()  # nothing is written before the arguments are checked


def test_unreachable_bucket(storage_options):
    with pytest.raises(UserError, match="bucket 'no-such-bucket'"):
        write_synthetic_slide("s3://no-such-bucket/x.zarr", size=(64, 64), storage_options=storage_options)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_writes_a_slide(tmp_path, capsys):
    out = str(tmp_path / "cli.ome.zarr")
    rc = main(["synth", out, "--size", "200", "300", "--channels", "2", "--ngff", "0.4", "--seed", "9",
               "--chunk", "128", "--pixel-size", "0.25"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "NGFF 0.4" in printed and "DAPI, E-cadherin" in printed and "200x300" in printed
    validate_ome_zarr(out)
    image = open_image(out)
    assert image.levels[0].shape == (2, 200, 300) and image.levels[0].scale == (1.0, 0.25, 0.25)
    pixels, _ = read_level0(out)
    expected = TissueModel((200, 300), seed=9, channels=2).render(0, 200, 0, 300).image
    np.testing.assert_array_equal(pixels, expected)


def test_cli_writes_to_s3_with_storage_options(s3_prefix, storage_options):
    import json

    url = f"{s3_prefix}/cli.zarr"
    endpoint = {"endpoint_url": storage_options["endpoint_url"]}  # the keys come from the environment
    assert main(["synth", url, "--size", "128", "128", "--chunk", "64", "--storage-options", json.dumps(endpoint)]) == 0
    validate_ome_zarr(url, storage_options)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "x.zarr"), "--size", "0", "10"]) == 2
    assert capsys.readouterr().err.strip() == "cellsam-ray: error: size must be positive, got 0x10"
    assert main(["synth", str(tmp_path / "x.zarr"), "--storage-options", "{nope"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
