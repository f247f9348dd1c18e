import numpy as np
import pytest

from cellsam_ray.evaluate import score_arrays, score_zarr


def test_identical_labels_score_one_whatever_the_ids():
    true = np.zeros((20, 20), np.uint32)
    true[2:8, 2:8], true[10:18, 10:18] = 1, 2
    pred = np.where(true == 1, 7, np.where(true == 2, 3, 0))
    s = score_arrays(pred, true)
    assert (s.f1, s.precision, s.recall, s.mean_iou, s.true_positives) == (1.0, 1.0, 1.0, 1.0, 2)


def test_missed_extra_and_poorly_overlapping_cells():
    true = np.zeros((30, 30), np.uint32)
    true[0:10, 0:10], true[15:25, 15:25], true[0:4, 20:24] = 1, 2, 3
    pred = np.zeros_like(true)
    pred[0:10, 0:8] = 1            # IoU 0.8 with cell 1: a match
    pred[15:25, 15:19] = 2         # IoU 0.4 with cell 2: no match
    pred[26:30, 0:4] = 3           # nothing there: a false positive
    s = score_arrays(pred, true)   # cell 3 missed
    assert s.true_positives == 1 and s.predicted == 3 and s.true == 3
    assert s.f1 == pytest.approx(1 / (1 + 0.5 * (2 + 2)))
    assert s.mean_iou == pytest.approx(0.8)


def test_blockwise_scoring_equals_whole_image_scoring():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 30, (64, 64)).repeat(4, 0).repeat(4, 1)
    pred = np.roll(true, 2, axis=1)
    assert score_zarr(pred, true, block=50) == score_arrays(pred, true)
