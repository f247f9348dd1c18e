"""Reference mode: box selection, label painting and cleanup, and the whole tile against the golden outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_fill_holes, find_objects

from cellsam_ray.evaluate import label_agreement
from cellsam_ray.model.boxes import box_score_threshold, boxes_to_input_pixels, confident_boxes, sklearn_centres
from cellsam_ray.model.postprocess import fill_holes_and_remove_small_masks, paint_masks
from cellsam_ray.model.reference import TileSegmentation, segment_tile_reference
from cellsam_ray.model.two_means import two_means_centres
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.testing.checks import reference_dir

REFERENCE = reference_dir()
GOLDEN = REFERENCE / "golden"
CASES = json.loads((GOLDEN / "cases.json").read_text())
SMALLEST = "rgb3_256_nonorm"


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def tiny_model():
    return load_cellsam(str(GOLDEN / "tiny_cellsam.pt"), str(GOLDEN / "tiny_config.json"))


@pytest.fixture(scope="module", params=sorted(CASES))
def golden_run(request, tiny_model):
    case = request.param
    image = np.load(GOLDEN / f"{case}.input.npy")
    result = segment_tile_reference(image, tiny_model, normalize=CASES[case]["normalize"], keep_embedding=True)
    return image, result, np.load(GOLDEN / f"{case}.expected.npz")


# --- box selection -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_dynamic_threshold_keeps_the_golden_boxes(case):
    golden = np.load(GOLDEN / f"{case}.expected.npz")
    scores, boxes = torch.from_numpy(golden["detector_scores"]), torch.from_numpy(golden["detector_boxes_1024"])
    kept_scores, kept = confident_boxes(scores, boxes, 0.4)
    assert torch.equal(kept, torch.from_numpy(golden["kept_boxes_1024"]))
    assert torch.all(kept_scores[:-1] >= kept_scores[1:])  # detector order (descending score) is kept


def test_threshold_moves_with_the_two_score_groups():
    scores = np.array([0.1] * 50 + [0.9] * 50, dtype=np.float32)
    assert box_score_threshold(scores, 0.4) == pytest.approx(0.66 * 0.4 + 0.33 * 0.5, abs=1e-6)
    assert box_score_threshold(np.full(10, 0.8, dtype=np.float32), 0.4) == pytest.approx(0.264 + 0.33 * 0.8)


def test_closed_form_two_means_is_sklearns_kmeans():
    """The replay gives sklearn's centres (to float32 rounding) wherever it answers, and answers on
    detector-like scores (a mass near 0, a group of confident cells); the golden tiles are covered too."""
    rng = np.random.default_rng(0)
    answered = 0
    cases = [np.load(GOLDEN / f"{case}.expected.npz")["detector_scores"] for case in sorted(CASES)]
    for i in range(40):
        n = (100, 1000, 3500)[i % 3]
        confident = rng.integers(1, n // 2)
        scores = np.concatenate([rng.beta(0.5, 20, n - confident), rng.beta(20, 2, confident)])
        cases.append((-np.sort(-scores) if i % 2 else scores).astype(np.float32))
    cases += [rng.uniform(size=300).astype(np.float32), np.round(rng.uniform(size=500), 2).astype(np.float32)]
    for scores in cases:
        centres = two_means_centres(scores)
        if centres is not None:
            answered += 1
            np.testing.assert_allclose(np.sort(centres), np.sort(sklearn_centres(scores).ravel()), atol=5e-6)
    assert answered >= 40


@pytest.mark.parametrize("scores", [[], [0.7]])
def test_threshold_falls_back_to_bbox_threshold_when_2_means_cannot_run(scores):
    assert box_score_threshold(np.array(scores, dtype=np.float32), 0.37) == 0.37


def test_boxes_scale_separately_along_x_and_y():
    boxes = torch.tensor([[0.0, 0.0, 1024.0, 1024.0], [512.0, 256.0, 768.0, 1024.0]])
    np.testing.assert_array_equal(
        boxes_to_input_pixels(boxes, height=300, width=200).numpy(),
        [[0, 0, 200, 300], [100, 75, 150, 300]],
    )


# --- painting and cleanup ------------------------------------------------------------------------------


def test_later_masks_win_overlaps():
    a = np.zeros((4, 4), dtype=bool)
    a[:, :3] = True
    b = np.zeros((4, 4), dtype=bool)
    b[:, 2:] = True
    labels = paint_masks(iter([a, b]), (4, 4))
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels[0], [1, 1, 2, 2])
    assert not paint_masks(iter([]), (4, 4)).any()


def test_fill_holes_remove_small_and_renumber():
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[1:8, 1:8] = 2  # a ring around a hole: filled
    labels[4, 4] = 0
    labels[10, 10] = 5  # 1 pixel: removed
    labels[12:18, 12:18] = 7
    out, sources, regions = fill_holes_and_remove_small_masks(labels.copy(), min_size=25)
    assert sources.tolist() == [2, 7] and regions == [(slice(1, 8), slice(1, 8)), (slice(12, 18), slice(12, 18))]  # label 1 was label 2, label 2 was label 7
    assert out[4, 4] == 1 and np.sum(out == 1) == 49
    assert out[10, 10] == 0
    assert np.sum(out == 2) == 36 and out.max() == 2
    assert fill_holes_and_remove_small_masks(labels.copy(), min_size=0)[0][10, 10] == 2


def test_filled_holes_swallow_enclosed_cells_as_published():
    labels = np.zeros((30, 30), dtype=np.int32)
    labels[0:30, 0:30] = 1
    labels[5:25, 5:25] = 0
    labels[10:20, 10:20] = 2  # a cell inside the ring's hole
    out, sources, regions = fill_holes_and_remove_small_masks(labels, min_size=25)
    assert np.all(out == 1) and sources.tolist() == [1] and regions == [(slice(0, 30), slice(0, 30))]


def _published_cleanup(labels: np.ndarray, min_size: int) -> np.ndarray:
    """The published Cellpose port, line for line: the yardstick of the faster cleanup."""
    kept = 0
    for index, region in enumerate(find_objects(labels)):
        if region is None:
            continue
        view = labels[region]
        mask = view == index + 1
        size = int(mask.sum())
        if min_size > 0 and size < min_size:
            view[mask] = 0
        elif size > 0:
            kept += 1
            view[binary_fill_holes(mask)] = kept
    return labels


def test_cleanup_equals_the_published_loop_and_names_each_cells_mask():
    """Random painted tiles: rings, slit cells, overlaps, nested and tiny cells, several size limits."""
    rng = np.random.default_rng(1)
    for _ in range(120):
        height, width = rng.integers(20, 120, 2)
        yy, xx = np.mgrid[0:height, 0:width]
        masks = []
        for _ in range(rng.integers(1, 40)):
            cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(1, 25)
            distance = np.hypot(yy - cy, xx - cx)
            mask = distance < radius
            kind = rng.integers(4)
            if kind == 0:
                mask &= distance >= radius * rng.uniform(0.2, 0.8)  # a ring
            elif kind == 1:
                mask &= ~((np.abs(yy - cy) < 2) & (np.abs(xx - cx) < radius / 2))  # a slit
            masks.append(mask)
        painted = paint_masks(masks, (height, width))
        min_size = int(rng.choice([0, 5, 25]))
        labels, sources, regions = fill_holes_and_remove_small_masks(painted.copy(), min_size)
        np.testing.assert_array_equal(labels, _published_cleanup(painted.copy(), min_size))
        extents = find_objects(labels, max_label=len(sources))
        assert regions == extents
        for k, source in enumerate(sources, start=1):
            assert not np.any(labels == k) or np.any((labels == k) & (painted == source))


# --- the whole tile -------------------------------------------------------------------------------------


def test_labels_match_golden(golden_run):
    _, result, golden = golden_run
    assert result.labels.dtype == np.int32 and result.labels.shape == golden["labels"].shape
    agree, worst_iou = label_agreement(result.labels, golden["labels"])
    assert agree >= 0.995 and worst_iou >= 0.9
    assert result.labels.max() == golden["labels"].max()
    np.testing.assert_array_equal(np.unique(result.labels), np.arange(result.labels.max() + 1))


def test_boxes_and_embedding_match_golden(golden_run):
    _, result, golden = golden_run
    assert result.boxes.shape == golden["boxes_original_xyxy"].shape
    np.testing.assert_allclose(result.boxes, golden["boxes_original_xyxy"], rtol=1e-5, atol=1e-3)
    assert result.embedding.shape == golden["embedding"].shape
    assert rel_l2(result.embedding, golden["embedding"]) < 1e-4
    n = len(result.boxes)
    assert result.scores.shape == result.ious.shape == (n,)
    # Every golden box survives the IoU filter, so the painted boxes' scores are the kept detections'.
    assert n == len(golden["kept_boxes_1024"])
    assert rel_l2(result.scores, golden["detector_scores"][:n]) < 1e-4


@pytest.mark.parametrize("kwargs", [{"bbox_threshold": 2.0}, {"iou_threshold": 1.1}])
def test_nothing_surviving_gives_an_empty_tile(tiny_model, kwargs):
    image = np.load(GOLDEN / f"{SMALLEST}.input.npy")
    result = segment_tile_reference(image, tiny_model, normalize=False, keep_embedding=True, **kwargs)
    assert isinstance(result, TileSegmentation)
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.int32 and not result.labels.any()
    assert result.boxes.shape == (0, 4) and result.scores.shape == result.ious.shape == (0,)
    assert result.embedding.shape == (1, 32, 64, 64)


def test_iou_filter_drops_exactly_the_low_rated_masks(tiny_model):
    image = np.load(GOLDEN / f"{SMALLEST}.input.npy")
    full = segment_tile_reference(image, tiny_model, normalize=False, iou_threshold=0.0)
    cut = float(np.median(full.ious))
    part = segment_tile_reference(image, tiny_model, normalize=False, iou_threshold=cut)
    keep = full.ious >= np.float32(cut)
    assert 0 < keep.sum() < len(keep)
    np.testing.assert_array_equal(part.boxes, full.boxes[keep])
    np.testing.assert_array_equal(part.ious, full.ious[keep])
