"""The merge, proved without a model: an oracle that returns the true cells seen through each window."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellsam_ray.merge.candidates import tile_candidates
from cellsam_ray.merge.objects import CellSet
from cellsam_ray.merge.rasterise import rasterise_core
from cellsam_ray.merge.reconcile import global_offsets, reconcile_home
from cellsam_ray.segmenter import check_detections
from cellsam_ray.testing.checks import same_up_to_relabelling
from cellsam_ray.testing.oracle import GroundTruthSegmenter
from cellsam_ray.tiling import plan_grid


def blob_labels(shape, n_cells, max_radius, seed):
    """Touching irregular cells: a Voronoi of random seeds, cut by a random max radius per cell."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, dtype=np.int32)
    ys, xs = rng.integers(0, shape[0], n_cells), rng.integers(0, shape[1], n_cells)
    seeds[ys, xs] = np.arange(1, n_cells + 1)
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[iy, ix]
    radius = rng.uniform(max_radius / 3, max_radius, n_cells + 1)
    labels[dist > radius[labels]] = 0
    return labels.astype(np.uint32)


def run_merge(labels, *, tile, halo, band, order=None, segmenter=None):
    grid = plan_grid(*labels.shape, tile=tile, halo=halo, chunk=tile // 2 or 1, band=band)
    segmenter = segmenter or GroundTruthSegmenter(labels)
    tiles = grid.tiles()
    candidates = {}
    for t in (tiles if order is None else [tiles[i] for i in order]):
        window = np.zeros((1, grid.window_size, grid.window_size), np.float32)
        found = check_detections(segmenter.segment(window, origin=t.origin), "oracle")
        candidates[(t.row, t.col)] = tile_candidates(found, t, grid, band)
    kept, suppressed = {}, 0
    for t in tiles:
        kept[(t.row, t.col)], n = reconcile_home(
            (t.row, t.col), [candidates[rc] for rc in grid.neighbourhood(t.row, t.col)]
        )
        suppressed += n
    offsets = global_offsets([len(kept[(t.row, t.col)]) for t in tiles])
    for t, offset in zip(tiles, offsets):
        cells = kept[(t.row, t.col)]
        cells.set_col("id", offset + np.arange(1, len(cells) + 1))
    out = np.zeros(labels.shape, np.uint32)
    for t in tiles:
        out[t.core_y0 : t.core_y1, t.core_x0 : t.core_x1] = rasterise_core(
            t, [kept[rc] for rc in grid.neighbourhood(t.row, t.col)]
        )
    all_kept = CellSet.concat(list(kept.values()))
    return out, all_kept, suppressed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_merge_reproduces_ground_truth(seed):
    labels = blob_labels((300, 260), 260, max_radius=14, seed=seed)
    out, kept, suppressed = run_merge(labels, tile=64, halo=24, band=8)
    assert same_up_to_relabelling(out, labels)
    # Ids are contiguous 1..N and every true cell is there exactly once.
    n_true = len(np.unique(labels)) - 1
    assert sorted(np.unique(out[out > 0]).tolist()) == list(range(1, n_true + 1))
    assert len(kept) == n_true
    # Jittered boxes near seams were claimed twice and reconciled, not duplicated.
    assert suppressed > 0


def test_merge_is_independent_of_tile_order():
    labels = blob_labels((200, 200), 150, max_radius=12, seed=5)
    grid_tiles = 16
    first, _, _ = run_merge(labels, tile=50, halo=20, band=6)
    shuffled = np.random.default_rng(3).permutation(grid_tiles)
    second, _, _ = run_merge(labels, tile=50, halo=20, band=6, order=shuffled)
    assert np.array_equal(first, second)


def test_cells_larger_than_the_halo_are_flagged_not_lost():
    labels = np.zeros((128, 128), np.uint32)
    labels[10:110, 40:70] = 1  # 100 px tall: larger than 2 × halo
    labels[5:15, 100:110] = 2
    out, kept, _ = run_merge(labels, tile=64, halo=16, band=4)
    big = kept.subset(np.nonzero(kept.col("oversized") > 0)[0])
    assert len(big) >= 1
    # The small cell is exact; no pixel of the big one is left unlabelled.
    assert np.array_equal(out[labels == 2], np.full(100, out[10, 100]))
    assert np.all(out[labels == 1] > 0)


def test_candidate_record_roundtrips_through_bytes():
    labels = blob_labels((100, 100), 40, max_radius=10, seed=9)
    grid = plan_grid(100, 100, tile=50, halo=20, chunk=25, band=5)
    t = grid.tile_at(0, 1)
    found = check_detections(GroundTruthSegmenter(labels).segment(np.zeros((1, 90, 90)), origin=t.origin), "o")
    cells = tile_candidates(found, t, grid, 5)
    back = CellSet.from_bytes(cells.to_bytes())
    assert np.array_equal(back.meta, cells.meta)
    assert all(np.array_equal(a, b) for a, b in zip(back.masks, cells.masks))


def test_a_cell_cut_by_the_image_edge_keeps_a_home_even_when_its_box_reaches_past_it():
    from cellsam_ray.segmenter import Detections

    grid = plan_grid(64, 64, tile=32, halo=8, chunk=16, band=4)
    t = grid.tile_at(1, 1)
    # A one-pixel-tall cell on the image's last row, its box grown far past the bottom border.
    box = np.array([[20.0, 39.0, 30.0, 52.0]])  # window pixels (origin (24, 24)): rows 63..75 of 64
    mask = np.zeros((13, 10), bool)
    mask[0, :] = True
    found = Detections(boxes=box, scores=np.ones(1), ious=np.ones(1), masks=[mask])
    cells = tile_candidates(found, t, grid, band=4)
    assert len(cells) == 1
    assert (cells.col("home_row")[0], cells.col("home_col")[0]) == (1, 1)
    assert cells.col("cy")[0] < 64


def test_masks_are_trimmed_to_their_own_extent_all_at_once():
    """``_trimmed`` (every crop's extent from a few segmented reductions) gives what cutting each mask
    to its rows and columns with pixels gives, including empty, one-line and zero-width crops."""
    from cellsam_ray.merge.candidates import _trimmed

    rng = np.random.default_rng(5)
    crops = [rng.random((h, w)) < p for h, w, p in
             [(rng.integers(0, 40), rng.integers(0, 40), rng.choice([0.0, 0.002, 0.05, 0.5, 1.0])) for _ in range(400)]]
    crops += [np.zeros((3, 0), bool), np.zeros((0, 4), bool), np.ones((1, 1), bool), np.eye(5, dtype=bool)[:, ::-1]]
    index = np.arange(len(crops)) * 7
    kept, (top, left, bottom, right), packed = _trimmed(crops, index)
    expected = []
    for i, crop in enumerate(crops):
        rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
        if rows.size:
            expected.append((i * 7, rows[0], cols[0], rows[-1] + 1, cols[-1] + 1,
                             crop[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]))
    assert kept.tolist() == [e[0] for e in expected] and 0 < len(expected) < len(crops)
    assert np.stack([top, left, bottom, right], axis=1).tolist() == [list(e[1:5]) for e in expected]
    assert all(np.array_equal(mask, e[5]) for mask, e in zip(packed, expected))
    kept, _, packed = _trimmed([np.zeros((4, 3), bool), np.zeros((0, 2), bool)], np.arange(2))
    assert kept.size == 0 and len(packed) == 0
    corner = np.zeros((2, 2), bool)
    corner[1, 1] = True  # the last pixel, before crops of zero-length lines
    kept, extents, packed = _trimmed([corner, np.zeros((0, 2), bool), np.zeros((2, 0), bool)], np.arange(3))
    assert kept.tolist() == [0] and [e.tolist() for e in extents] == [[1], [1], [2], [2]]
