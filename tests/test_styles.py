"""The synthetic style family: each style's ground truth matches its pixels, its cells have the style's
sizes and arrangement, every style is deterministic per seed, and ``synth --style`` writes valid OME-Zarr."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellsam_ray.cli import main
from cellsam_ray.io.ngff import open_image
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.synth.styles import STYLES, TRAINING_STYLES, borders, grayscale, render_style
from cellsam_ray.testing.checks import validate_ome_zarr
from cellsam_ray.train.synthetic import LAYOUTS, scaled_roles, style_windows

SHAPE = (512, 512)
DIAMETER = {  # median equivalent diameter (px) a style's objects must have, over seeds 1-3
    "nuclei": (7, 40), "envelope": (7, 40), "epithelium": (12, 60), "stroma": (10, 45),
    "lymphocytes": (6, 14), "large": (28, 95), "brightfield": (7, 35), "tissue": (10, 30),
}


@pytest.fixture(scope="module", params=STYLES)
def drawn(request):
    return [render_style(request.param, SHAPE, seed) for seed in (1, 2, 3)]


def diameters(labels):
    _, counts = np.unique(labels[labels > 0], return_counts=True)
    return np.sqrt(4 * counts / np.pi)


def test_every_style_has_its_channels_roles_and_label_images(drawn):
    for image in drawn:
        assert image.labels.shape == image.nuclei.shape == SHAPE and image.labels.dtype == np.uint32
        assert image.image.shape == (len(image.channel_names),) + SHAPE
        assert set(image.nuclear + image.whole_cell) <= set(image.channel_names)
        ids = np.unique(image.labels[image.labels > 0])
        assert len(ids) > 10
        assert image.style == "tissue" or ids[-1] == len(ids)  # numbered 1..N (tissue: by lattice site)
        assert (image.nuclei[image.nuclei > 0] == image.labels[image.nuclei > 0]).all()  # a nucleus is in its cell
        if image.stain == "brightfield":
            assert image.image.dtype == np.uint8 and not image.nuclear
        else:
            assert image.image.dtype == np.uint16 and image.nuclear


def test_each_object_is_one_connected_piece_of_the_stated_size(drawn):
    lo, hi = DIAMETER[drawn[0].style]
    for image in drawn:
        slices = ndimage.find_objects(image.labels)
        pieces = [ndimage.label(image.labels[box] == i + 1)[1] for i, box in enumerate(slices) if box is not None]
        assert np.mean(np.array(pieces) == 1) > 0.99
        assert lo <= np.median(diameters(image.labels)) <= hi, image.params


def test_ground_truth_matches_the_pixels(drawn):
    """The objects are where the signal is: cells stand out from the background in the role channels, rims
    are bright in membrane styles, nuclei are bright in DAPI (dark in brightfield)."""
    for image in drawn:
        nuclear, whole = scaled_roles(image)
        objects = image.labels > 0
        far = ~ndimage.binary_dilation(objects, iterations=4)
        if image.stain == "brightfield":
            gray = grayscale(image.image)
            tissue_not_nuclei = far & (gray < np.percentile(gray, 99))
            assert gray[objects].mean() < gray[tissue_not_nuclei].mean() - 0.1
            continue
        seen = whole if image.style in ("stroma", "large") else nuclear
        per_cell = ndimage.mean(seen, image.labels, np.unique(image.labels[objects]))
        background = np.percentile(seen[far], 75) if far.any() else 0.0
        assert np.mean(per_cell > background) > 0.8, image.params
        if image.whole_cell:
            assert nuclear[image.nuclei > 0].mean() > 1.5 * nuclear[objects & (image.nuclei == 0)].mean()
        if image.style in ("epithelium", "lymphocytes", "tissue", "envelope"):
            channel = nuclear if image.style == "envelope" else whole
            rim = borders(image.labels, 1)
            inside = objects & ~ndimage.binary_dilation(rim, iterations=2)
            assert channel[rim].mean() > 1.3 * channel[inside].mean()


def test_styles_are_arranged_as_named():
    gaps = {style: np.mean([(render_style(style, SHAPE, s).labels == 0).mean() for s in (1, 2)])
            for style in ("epithelium", "stroma")}
    assert gaps["stroma"] > gaps["epithelium"] + 0.2  # sparse stroma, dense epithelium
    epithelium = render_style("epithelium", SHAPE, 1)
    inside = ndimage.binary_erosion(epithelium.labels > 0, iterations=3)
    touching = borders(epithelium.labels, 1) & ndimage.binary_erosion(epithelium.labels > 0)
    assert touching.sum() > 0.5 * borders(epithelium.labels, 1).sum() and inside.any()  # cells share borders


def test_same_seed_same_image_other_seed_another():
    for style in STYLES:
        a, b, c = (render_style(style, (128, 160), seed) for seed in (5, 5, 6))
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert (a.image != c.image).mean() > 0.3


def test_unknown_style_and_oversized_images_are_refused():
    with pytest.raises(ValueError, match="unknown style"):
        render_style("phase", (64, 64), 0)
    with pytest.raises(ValueError, match="drawn in memory"):
        render_style("nuclei", (5000, 5000), 0)


def test_synth_command_writes_a_style_as_valid_ome_zarr(tmp_path, capsys):
    url = str(tmp_path / "bf.ome.zarr")
    assert main(["synth", url, "--style", "brightfield", "--size", "300", "260", "--seed", "4", "--chunk", "128"]) == 0
    assert "(brightfield)" in capsys.readouterr().out
    validate_ome_zarr(url)
    image = open_image(url)
    assert image.channel_names == ("R", "G", "B") and image.levels[0].dtype == np.uint8
    expected = render_style("brightfield", (300, 260), 4)
    np.testing.assert_array_equal(image.array(0)[:], expected.image)
    np.testing.assert_array_equal(image.label("ground_truth").array(0)[:], expected.labels)

    url = str(tmp_path / "epi.ome.zarr")
    write_synthetic_slide(url, size=(256, 256), seed=4, chunk=128, ngff="0.4", style="epithelium")
    validate_ome_zarr(url)
    image = open_image(url)
    expected = render_style("epithelium", (256, 256), 4)
    np.testing.assert_array_equal(image.label("nuclei").array(0)[:], expected.nuclei)
    assert main(["synth", str(tmp_path / "x.zarr"), "--style", "nuclei", "--channels", "2"]) == 2
    assert "has its own channels" in capsys.readouterr().err


def test_training_windows_show_every_layout_and_scale():
    items = style_windows(["epithelium"], [1, 2], 768, 256, seed=0)
    filled = [(bool(i.image[..., 1].any()), bool(i.image[..., 2].any())) for i in items]
    assert {(True, True), (True, False), (False, True)} <= set(filled) and len(LAYOUTS) == 3
    assert not any(i.image[..., 0].any() for i in items)  # the blank channel stays blank
    sides = {i.image.shape[0] for i in items}
    assert min(sides) < 230 and max(sides) > 290  # scale augmentation
    for item in items:
        assert item.image.shape[:2] == item.labels.shape and 0 <= item.image.min() and item.image.max() <= 1
    # Nuclear only: the targets are the nuclei, smaller than the cells the other layouts target.
    size = {layout: np.median(np.concatenate([diameters(i.labels) for i, f in zip(items, filled) if f == layout]))
            for layout in ((True, False), (True, True))}
    assert size[(True, False)] < 0.8 * size[(True, True)]
    assert set(TRAINING_STYLES) == set(STYLES) - {"envelope"}


def test_windows_without_augmentation_show_every_channel_a_style_has():
    """Scoring windows (``augment=False``) show a two-role style with both roles (they once fell through to
    whole-cell only) and a nuclear-only style with its nuclear channel."""
    from cellsam_ray.train.synthetic import windows_of

    for style, filled in (("epithelium", (True, True)), ("nuclei", (True, False))):
        items = windows_of(render_style(style, (512, 512), 3), 256, np.random.default_rng(0), augment=False)
        assert items and {(bool(i.image[..., 1].any()), bool(i.image[..., 2].any())) for i in items} == {filled}
