"""``--stain``: what the segmenter sees of a fluorescence or a brightfield slide, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2gray

from cellsam_ray.cli import main
from cellsam_ray.driver.windows import plan_run
from cellsam_ray.pipeline.intensity import tissue_mask
from cellsam_ray.pipeline.source import read_window
from cellsam_ray.pipeline.stain import BRIGHTFIELD, FLUORESCENCE
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.testing.ecosystem import brightfield, disc_cells, fluorescence, write_with_ome_zarr_py

ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr("cellsam_ray.driver.api.ensure_ray", lambda: pytest.fail("reached Ray"))


def test_grey_is_skimage_rgb2gray_and_transparent_pixels_are_glass():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 20, 30), dtype=np.uint8)
    grey = BRIGHTFIELD.grey(rgb, np.uint8)
    np.testing.assert_allclose(grey / 255, rgb2gray(np.moveaxis(rgb, 0, -1)), atol=1e-5)
    rgba = np.concatenate([rgb, np.zeros((1, 20, 30), np.uint8)])
    rgba[3, :10] = 255
    composited = BRIGHTFIELD.grey(rgba, np.uint8)
    np.testing.assert_allclose(composited[:10], grey[:10], rtol=1e-6)
    np.testing.assert_allclose(composited[10:], 255, rtol=1e-6)  # fully transparent: white glass


def test_brightfield_window_is_the_published_grey_layout():
    """CellSAM's own ``format_image_shape`` puts a grey image in the whole-cell slot with the nuclear one
    blank; the brightfield window is (blank, grey), which ``cellsam_layout`` turns into exactly that."""
    from cellsam_ray.model.preprocess import format_image_shape
    from cellsam_ray.model.cellsam import cellsam_layout

    tissue = np.ones((64, 64), bool)
    rgb = brightfield(disc_cells((64, 64), seed=1), tissue, seed=1)
    scales = BRIGHTFIELD.scales(rgb.astype(np.float32), np.uint8)
    window = BRIGHTFIELD.window(rgb, ((), (0, 1, 2)), scales, np.uint8)
    assert window.shape == (2, 64, 64) and window.dtype == np.float32
    assert not window[0].any() and 0 <= window[1].min() and window[1].max() <= 1
    np.testing.assert_array_equal(cellsam_layout(window), format_image_shape(window[1]).astype(np.float32))


def test_brightfield_tissue_is_darker_than_glass():
    yy, xx = np.mgrid[0:200, 0:200]
    tissue = (yy - 100) ** 2 + (xx - 100) ** 2 < 60**2
    rgb = brightfield(disc_cells((200, 200), seed=2, where=tissue), tissue, seed=2).astype(np.float32)
    scales = BRIGHTFIELD.scales(rgb, np.uint8)
    mask = tissue_mask(BRIGHTFIELD.tissue_signal(rgb, ((), (0, 1, 2)), scales, np.uint8))
    assert mask[tissue].mean() > 0.99 and mask[:20].sum() == 0 and mask[:, -20:].sum() == 0
    # The fluorescence reading of the same slide would call the bright glass tissue.
    fluo = tissue_mask(FLUORESCENCE.tissue_signal(rgb, ((0, 1, 2),), FLUORESCENCE.scales(rgb, np.uint8), np.uint8))
    assert fluo[:20].all()


def test_nuclear_is_required_for_fluorescence_only():
    with pytest.raises(ValueError, match="nuclear\n.*Field required"):
        SegmentSpec(input="x")
    assert SegmentSpec(input="x", stain="brightfield").nuclear == []


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("stains")
    truth = disc_cells((96, 96), seed=3)
    out = {}
    for name, pixels in {
        "rgb": brightfield(truth, np.ones((96, 96), bool), seed=3),
        "rgba": brightfield(truth, np.ones((96, 96), bool), seed=3, alpha=True),
        "two": fluorescence(truth, 2, np.uint16, seed=3),
        "float": fluorescence(truth, 3, np.float32, seed=3),
    }.items():
        out[name] = write_with_ome_zarr_py(str(root / f"{name}.ome.zarr"), pixels, version="0.5",
                                           chunks=(1, 64, 64), scale_factors=[])
    out["yx"] = write_with_ome_zarr_py(str(root / "yx.ome.zarr"), truth.astype(np.uint8), version="0.5",
                                       axes="yx", chunks=(64, 64), scale_factors=[])
    return out


@pytest.mark.parametrize("name", ["rgb", "rgba"])
def test_brightfield_plan_reads_the_colours(slides, name):
    plan = plan_run(SegmentSpec(input=slides[name], stain="brightfield", segmenter=ORACLE,
                                segmenter_options=dict(labels=slides[name]), tile=64, halo=16, chunk=32))
    assert plan.channels == ((0, 1, 2) if name == "rgb" else (0, 1, 2, 3))
    assert plan.roles == ((), (0, 1, 2)) and len(plan.scales) == 1


@pytest.mark.parametrize("stain, name, outside", [("brightfield", "rgb", (0.0, 1.0)), ("fluorescence", "two", (0.0, 0.0))])
def test_a_window_past_the_slide_edge_is_padded_with_the_stains_background(slides, stain, name, outside):
    """Black past a brightfield slide's edge would look like one large dark nucleus: the padding is glass."""
    fields = dict(nuclear=["0"], whole_cell=["1"]) if stain == "fluorescence" else {}
    plan = plan_run(SegmentSpec(input=slides[name], stain=stain, segmenter=ORACLE,
                                segmenter_options=dict(labels=slides[name]), tile=64, halo=16, chunk=32,
                                **fields))
    corner = plan.grid.tile_at(0, 0)
    window = read_window(plan, corner)
    inside = window[:, 16:, 16:]
    for role, value in enumerate(outside):
        assert np.all(window[role, :16, :] == value) and np.all(window[role, :, :16] == value)
    assert not np.all(inside[len(outside) - 1] == outside[-1])  # the slide itself is not background


@pytest.mark.parametrize("name, argv, message", [
    ("rgb", ["--nuclear", "0"], "--stain brightfield takes the image's colour channels as they are: drop "
                                "--nuclear and --whole-cell"),
    ("two", [], "--stain brightfield needs an RGB image, a c axis of 3 channels (4 with alpha); this one has "
                "a c axis of 2"),
    ("yx", [], "this one has no c axis (its axes are yx)"),
    ("float", [], "--stain brightfield needs RGB of unsigned integers (uint8, uint16), not float32"),
])
def test_what_brightfield_cannot_read_is_one_line(slides, capsys, name, argv, message):
    argv = ["segment", slides[name], "--stain", "brightfield", "--segmenter", ORACLE, "--tile", "64", "--halo",
            "16", "--chunk", "32", *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_fluorescence_without_a_nuclear_channel_is_one_line(slides, capsys):
    assert main(["segment", slides["two"], "--segmenter", ORACLE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nuclear: Field required: name the nuclear channel(s)" in err, err

