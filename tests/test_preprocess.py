"""Image preparation: the two model inputs equal the published code's, and each step does what it claims."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from skimage.exposure import rescale_intensity

from cellsam_ray.model import preprocess
from cellsam_ray.model.preprocess import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    detector_input,
    embedding_input,
    format_image_shape,
    normalize_image,
    quantize_uint8,
    resize_to_model,
    sam_pixel_normalize,
)
from cellsam_ray.testing.checks import reference_dir

REFERENCE = reference_dir()
GOLDEN = REFERENCE / "golden"
CASES = json.loads((GOLDEN / "cases.json").read_text())


def rel_l2(actual: torch.Tensor, expected: np.ndarray) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module", params=sorted(CASES))
def golden_case(request):
    """(resized input tensor, expected arrays) per golden case, prepared once."""
    case = request.param
    image = format_image_shape(np.load(GOLDEN / f"{case}.input.npy"))
    if CASES[case]["normalize"]:
        image = normalize_image(image)
    return resize_to_model(image), np.load(GOLDEN / f"{case}.expected.npz")


def test_embedding_input_matches_golden(golden_case):
    resized, expected = golden_case
    actual = embedding_input(resized)
    assert actual.shape == expected["model_input_embedding"].shape and actual.dtype == torch.float32
    assert rel_l2(actual, expected["model_input_embedding"]) < 1e-4


def test_detector_input_matches_golden(golden_case):
    resized, expected = golden_case
    actual = detector_input(resized)
    assert actual.shape == expected["model_input_detector"].shape and actual.dtype == torch.float32
    assert rel_l2(actual, expected["model_input_detector"]) < 1e-4


def test_resize_is_torchvision_v2_resize_exactly():
    image = np.random.default_rng(0).uniform(0, 1, size=(300, 200, 3))
    expected = T.Resize((1024, 1024))(torch.from_numpy(image.transpose(2, 0, 1)).float().unsqueeze(0))
    assert torch.equal(resize_to_model(image), expected)


@pytest.mark.parametrize(
    ("shape", "filled"),
    [((5, 7), [2]), ((5, 7, 1), [2]), ((5, 7, 2), [1, 2]), ((5, 7, 3), [0, 1, 2])],
)
def test_format_right_aligns_channels(shape, filled):
    image = np.arange(1, np.prod(shape) + 1, dtype=np.uint16).reshape(shape)
    out = format_image_shape(image)
    assert out.shape == (5, 7, 3) and out.dtype == np.float64
    channels = image.reshape(5, 7, -1)
    for i, channel in enumerate(filled):
        np.testing.assert_array_equal(out[:, :, channel], channels[:, :, i])
    for channel in set(range(3)) - set(filled):
        assert not out[:, :, channel].any()


@pytest.mark.parametrize("shape", [(5, 7, 4), (5, 7, 0), (5,), (2, 5, 7, 1)])
def test_format_rejects_other_shapes(shape):
    with pytest.raises(ValueError, match="H, W"):
        format_image_shape(np.zeros(shape))


def test_normalize_clips_hot_pixels_and_handles_flat_channels():
    rng = np.random.default_rng(1)
    image = np.zeros((200, 200, 3))
    image[:, :, 1] = 7.0  # constant -> 0
    image[:, :, 2] = rng.uniform(1, 100, size=(200, 200))
    image[50, 50, 2] = 1e6
    out = normalize_image(image)
    assert not out[:, :, :2].any()
    assert 0 <= out[:, :, 2].min() and out[:, :, 2].max() <= 1
    # The hot pixel is clipped at the 99.9th percentile, so its brightness no longer matters.
    brighter = image.copy()
    brighter[50, 50, 2] = 1e9
    np.testing.assert_array_equal(normalize_image(brighter), out)
    # ... while without the clip it would have squashed everything else towards 0.
    assert out[:, :, 2].mean() > 0.3


def test_quantize_truncates_and_wraps_like_to_pil_image():
    values = torch.tensor([-0.3, 0.0, 0.5, 0.999, 1.0, 1.5, 3.22])
    assert quantize_uint8(values).tolist() == [180, 0, 127, 254, 255, 126, 53]


def test_detector_input_fills_the_missing_marker_channel():
    rng = np.random.default_rng(2)
    gray = resize_to_model(format_image_shape(rng.uniform(0, 1, size=(64, 48))))
    x = detector_input(gray)
    assert not x[0, 0].any()
    assert torch.equal(x[0, 1], x[0, 2]) and x[0, 2].max() > 0
    nuclear = np.zeros((64, 48, 3))
    nuclear[:, :, 1] = rng.uniform(0, 1, size=(64, 48))
    x = detector_input(resize_to_model(nuclear))
    assert torch.equal(x[0, 2], x[0, 1]) and x[0, 1].max() > 0


def test_embedding_input_has_no_channel_fill_and_survives_a_blank_image():
    rng = np.random.default_rng(3)
    x = embedding_input(resize_to_model(format_image_shape(rng.uniform(0, 1, size=(64, 48)))))
    assert not x[0, :2].any() and x[0, 2].min() == 0 and x[0, 2].max() > 0.99
    blank = embedding_input(resize_to_model(np.zeros((64, 48, 3))))
    assert not blank.any()


def test_legacy_inputs_skip_the_per_channel_min_max():
    image = np.zeros((64, 48, 3))
    image[:, :, 1] = np.linspace(0, 0.5, 48)[None, :]  # half as bright as whole-cell
    image[:, :, 2] = np.linspace(0, 1.0, 48)[None, :]
    resized = resize_to_model(image)
    legacy = embedding_input(resized, adv_mode=False)
    assert legacy[0, 1].max() == pytest.approx(0.5, abs=0.01) and legacy[0, 2].max() == pytest.approx(1.0)
    assert embedding_input(resized)[0, 1].max() == pytest.approx(1.0, abs=1e-5)
    detector = detector_input(resized, adv_mode=False)
    expected = (quantize_uint8(resized).float() - torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        SAM_PIXEL_STD
    ).view(1, 3, 1, 1)
    assert torch.equal(detector, expected)


def test_sam_pixel_normalize_is_sam_statistics_on_the_unit_scale():
    unit = torch.full((1, 3, 2, 2), 0.5)
    out = sam_pixel_normalize(unit)
    expected = [(127.5 - m) / s for m, s in zip(SAM_PIXEL_MEAN, SAM_PIXEL_STD)]
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), expected, rtol=1e-5)


def _published_percentile_step(resized: torch.Tensor) -> torch.Tensor:
    """The published NumPy/scikit-image percentile step, image by image (the golden code's arithmetic)."""
    out = []
    for image in resized.numpy():
        nonzero = image[image != 0]
        if nonzero.size:
            low, high = np.percentile(nonzero, [0.0, 99.5])
            image = rescale_intensity(image, in_range=(low, high), out_range="float32")
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32)))
    return torch.stack(out)


def test_tensor_percentile_step_is_the_published_arithmetic_bit_for_bit():
    """Odd cases included: negative pixels ([-1, 1] output), a constant image, one lit pixel, ties, blank."""
    rng = np.random.default_rng(4)
    one = np.zeros((30, 30, 3))
    one[3, 4, 2] = 5
    images = [rng.uniform(0, 1, (300, 200, 3)), rng.normal(0, 1, (64, 48, 3)), np.full((40, 40, 3), 3.0), one,
              np.round(rng.uniform(0, 4, (128, 128, 3))), np.zeros((20, 20, 3))]
    for image in images:
        resized = resize_to_model(image)
        assert torch.equal(embedding_input(resized, adv_mode=False), _published_percentile_step(resized))


def test_accelerator_order_statistics_equal_the_cpu_partition():
    """The sort-based selection a GPU runs (no host sync) picks the same values as NumPy's partition."""
    rng = np.random.default_rng(5)
    flat = torch.from_numpy(np.round(rng.normal(0, 2, (3, 5000)), 1).astype(np.float32))
    flat[2] = 0
    count = (flat != 0).sum(dim=1)
    ranks = torch.stack((torch.zeros_like(count), count // 3, (count - 1).clamp(min=0)), dim=1)
    on_cpu = preprocess._partitioned_order_statistics(flat, ranks, count)
    assert torch.equal(on_cpu, preprocess._sorted_order_statistics(flat, ranks, count))
    assert torch.equal(on_cpu[0], torch.sort(flat[0][flat[0] != 0]).values[ranks[0]])
