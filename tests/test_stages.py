"""``pipeline.stages`` on its own (no Ray, no run): the segment stage's two parts, the reconcile stage and the
numbering, on real windows of a small slide through the ground-truth segmenter."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from cellsam_ray.io.ngff import open_image
from cellsam_ray.merge.candidates import tile_candidates
from cellsam_ray.merge.objects import META_COLUMNS
from cellsam_ray.merge.reconcile import global_offsets
from cellsam_ray.pipeline import source
from cellsam_ray.pipeline.stages import Inferred, finish_tiles, reconcile_tile, run_model, with_ids
from cellsam_ray.segmenter import check_detections
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.oracle import GroundTruthSegmenter

SIZE = (384, 384)
TILING = dict(tile=128, halo=32, band=8, chunk=64)  # a 3 × 3 grid; the halo holds the largest cells


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("stages") / "slide.ome.zarr")
    write_synthetic_slide(url, size=SIZE, channels=2, ngff="0.5", seed=17, chunk=128)
    return url


def truth(url: str) -> np.ndarray:
    return np.asarray(open_image(url).label("ground_truth").array(0)[:])


class BatchOracle(GroundTruthSegmenter):
    """The ground truth answering a whole batch in one call (``segment_batch``), counting the calls."""

    calls = 0

    def segment_batch(self, windows, *, origins):
        self.calls += 1
        return [self.segment(w, origin=o) for w, o in zip(windows, origins)]


class SplitOracle(GroundTruthSegmenter):
    """The ground truth in two parts (``infer_batch``): nothing under the model lock, the answer in the host
    part, which counts how often it ran."""

    finished = 0

    def infer_batch(self, windows, *, origins):
        return [partial(self._finish, w, o) for w, o in zip(windows, origins)]

    def _finish(self, window, origin):
        self.finished += 1
        return self.segment(window, origin=origin)


def candidates_of(plan, segmenter) -> dict[tuple[int, int], object]:
    """Every tile's candidates, by (row, col), through both parts of the segment stage."""
    tiles = plan.grid.tiles()
    done = finish_tiles(plan, tiles, run_model(segmenter, tiles, source.read_windows(plan, tiles)))
    return {(t.row, t.col): cells for t, (cells, _) in zip(tiles, done)}


def test_every_kind_of_segmenter_gives_the_same_answers_and_only_infer_batch_defers_its_host_work(
        slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="kinds", **TILING)
    tiles = [plan.grid.tile_at(0, 0), plan.grid.tile_at(1, 1), plan.grid.tile_at(2, 1)]
    windows = source.read_windows(plan, tiles)
    plain = source.build_segmenter(plan)  # the spec's own: only ``segment``
    expected = [plain.segment(w, origin=t.origin)["boxes"] for t, w in zip(tiles, windows)]
    assert sum(len(boxes) for boxes in expected) > 0
    labels = truth(slide)
    batch, split = BatchOracle(labels), SplitOracle(labels)
    for segmenter in (plain, batch, split):
        inferred = run_model(segmenter, tiles, windows)
        assert len(inferred.finishers) == 3 and inferred.seconds >= 0
        if segmenter is split:
            assert split.finished == 0  # the host part waits for the finishers
        got = [finish()["boxes"] for finish in inferred.finishers]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert batch.calls == 1 and split.finished == 3


def test_finishing_keeps_each_tiles_candidates_and_reports_them(slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="finish", **TILING)
    segmenter, tiles = source.build_segmenter(plan), plan.grid.tiles()[:4]
    windows = source.read_windows(plan, tiles)
    inferred = run_model(segmenter, tiles, windows)
    done = finish_tiles(plan, tiles, Inferred(inferred.finishers, seconds=8.0))
    for tile, window, (cells, outcome) in zip(tiles, windows, done):
        detections = check_detections(segmenter.segment(window, origin=tile.origin), "oracle")
        direct = tile_candidates(detections, tile, plan.grid, plan.band)
        assert cells.to_bytes() == direct.to_bytes()
        assert (outcome.key, outcome.candidates) == (tile.key, len(direct)) and len(direct) > 0
        assert outcome.model_seconds >= 8.0 / len(tiles)  # the model's time shared among the batch's tiles


def test_a_broken_answer_names_its_tile(slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="broken", **TILING)
    tile = plan.grid.tile_at(2, 2)
    wrong = dict(boxes=np.array([[0.0, 0.0, 4.0, 4.0]]), scores=np.array([0.9]), masks=[np.ones((2, 2), bool)])
    with pytest.raises(RuntimeError, match=f"segmenter on tile {tile.key}: mask 0 has shape"):
        finish_tiles(plan, [tile], Inferred([lambda: wrong], seconds=0.0))


def test_each_cell_is_kept_once_by_its_home_with_counts_that_say_why(slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="reconcile", **TILING)
    found, grid = candidates_of(plan, source.build_segmenter(plan)), plan.grid
    homes = [(t.row, t.col) for t in grid.tiles()]
    results = {home: reconcile_tile(home, [found[rc] for rc in grid.neighbourhood(*home)]) for home in homes}
    for (row, col), result in results.items():
        assert (result.kept.col("home_row") == row).all() and (result.kept.col("home_col") == col).all()
    assert sum(len(r.kept) for r in results.values()) == len(np.unique(truth(slide))) - 1
    assert sum(r.reconciled for r in results.values()) > 0  # copies across seams were settled
    # The cells fit their windows here (a 32 px halo): none is cut at a window's edge, none oversized.
    assert sum(r.cut_at_window + r.oversized for r in results.values()) == 0
    # A 2 px halo cuts cells at the window's edge, and boxes wider than 2 × halo are oversized.
    thin = plan_with_labels(slide, label_name="thin", tile=128, halo=2, band=2, chunk=64)
    found = candidates_of(thin, source.build_segmenter(thin))
    cut = [reconcile_tile(home, [found[rc] for rc in grid.neighbourhood(*home)]) for home in homes]
    assert sum(r.cut_at_window for r in cut) > 0
    assert sum(r.oversized for r in cut) == sum(len(r.kept) for r in cut)  # every cell is wider than 4 px


def test_ids_are_numbered_from_the_homes_offset_in_reconcile_order(slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="ids", **TILING)
    found, grid = candidates_of(plan, source.build_segmenter(plan)), plan.grid
    homes = [(t.row, t.col) for t in grid.tiles()]
    kept = [reconcile_tile(home, [found[rc] for rc in grid.neighbourhood(*home)]).kept for home in homes]
    numbered = [with_ids(cells, offset) for cells, offset in zip(kept, global_offsets([len(k) for k in kept]))]
    ids = np.concatenate([n.col("id") for n in numbered])
    assert ids.tolist() == list(range(1, len(ids) + 1))
    assert all((k.col("id") == 0).all() for k in kept)  # the kept cells themselves stay unnumbered
    rest = [i for i, name in enumerate(META_COLUMNS) if name != "id"]
    assert all(np.array_equal(n.meta[:, rest], k.meta[:, rest]) for n, k in zip(numbered, kept))  # same order
    assert len(with_ids(kept[0].subset(np.arange(0)), 5)) == 0
