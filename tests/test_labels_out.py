"""``pipeline.labels_out`` on its own (no Ray, no run): cores land where their tile lies, every other level
is built chunk by chunk from the level next to it and holds the right ids, and files go beside the labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellsam_ray.io.ngff import open_image
from cellsam_ray.pipeline import labels_out
from cellsam_ray.synth import write_synthetic_slide

# Levels 640×448, 320×224 and 160×112 (each half the one before); a 5 × 4 grid of 128² cores at level 0.
SIZE = (640, 448)
TILING = dict(tile=128, halo=32, band=8, chunk=64)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("labels_out") / "slide.ome.zarr")
    write_synthetic_slide(url, size=SIZE, channels=2, ngff="0.5", seed=9, chunk=128)
    return url


def truth(url: str, level: int) -> np.ndarray:
    return np.asarray(open_image(url).label("ground_truth").array(level)[:])


def halved(labels: np.ndarray) -> np.ndarray:
    """Each 2×2 block's most frequent non-zero id (ties to the smaller), 0 only where all four are 0."""
    h, w = labels.shape
    blocks = labels.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(-1, 4).astype(np.int64)
    votes = (blocks[:, :, None] == blocks[:, None, :]).sum(axis=2)
    rank = np.where(blocks > 0, votes * 2**33 - blocks, -1)  # more votes first, then the smaller id
    return blocks[np.arange(len(blocks)), rank.argmax(axis=1)].reshape(h // 2, w // 2)


def write_every_core(plan, labels: np.ndarray) -> None:
    for tile in plan.grid.tiles():
        labels_out.write_core(plan, tile, labels[tile.core_y0 : tile.core_y1, tile.core_x0 : tile.core_x1])


def build_every_chunk(plan) -> list[np.ndarray]:
    for level in labels_out.build_order(plan):
        for index in labels_out.chunk_indices(plan, level):
            labels_out.build_label_chunk(plan, level, index)
    return [np.asarray(array[:]) for array in labels_out.label_arrays(plan)]


def test_levels_are_built_outward_from_the_segmented_one(slide, plan_with_labels):
    finest = plan_with_labels(slide, label_name="order0", **TILING)
    assert labels_out.build_order(finest) == [1, 2]
    assert [labels_out.source_level(finest, level) for level in (1, 2)] == [0, 1]
    middle = plan_with_labels(slide, label_name="order1", level=1, **TILING)
    assert labels_out.build_order(middle) == [2, 0]
    assert [labels_out.source_level(middle, level) for level in (2, 0)] == [1, 1]


def test_a_core_is_written_where_its_tile_lies_and_nowhere_else(slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="one_core", **TILING)
    for tile, value in ((plan.grid.tile_at(1, 2), 7), (plan.grid.tile_at(4, 3), 9)):  # the second is 128 × 64
        labels_out.write_core(plan, tile, np.full((tile.core_y1 - tile.core_y0, tile.core_x1 - tile.core_x0),
                                                  value, np.uint32))
    expected = np.zeros(SIZE, np.uint32)
    expected[128:256, 256:384] = 7
    expected[512:640, 384:448] = 9
    assert np.array_equal(labels_out.label_arrays(plan)[0][:], expected)


def test_coarser_chunks_hold_the_mode_of_their_block_with_foreground_first(slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="coarser", **TILING)
    cells = truth(slide, 0)
    write_every_core(plan, cells)
    levels = build_every_chunk(plan)
    assert np.array_equal(levels[0], cells)
    assert np.array_equal(levels[1], halved(cells))
    assert np.array_equal(levels[2], halved(halved(cells)))
    for finer, coarser in zip(levels, levels[1:]):
        assert set(np.unique(coarser)) <= set(np.unique(finer))  # ids are never mixed into new ones


def test_finer_chunks_repeat_the_pixel_above_them_when_a_coarse_level_was_segmented(slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="finer", level=1, **TILING)
    assert plan.level == 1 and (plan.grid.height, plan.grid.width) == (320, 224)
    cells = truth(slide, 1)
    write_every_core(plan, cells)
    levels = build_every_chunk(plan)
    assert np.array_equal(levels[1], cells)
    assert np.array_equal(levels[0], np.repeat(np.repeat(cells, 2, axis=0), 2, axis=1))
    assert np.array_equal(levels[2], halved(cells))


def test_chunk_indices_cover_every_chunk_of_a_plain_image(slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="indices", **TILING)
    assert labels_out.chunk_indices(plan, 0) == [(r, c) for r in range(10) for c in range(7)]
    assert labels_out.chunk_indices(plan, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_sidecars_live_beside_the_labels(slide, plan_with_labels):
    plan = plan_with_labels(slide, label_name="beside", **TILING)
    url = labels_out.write_sidecar(plan, "qc/overview.png", b"picture")
    assert Path(url) == Path(slide, "labels", "beside", "qc", "overview.png")
    assert Path(url).read_bytes() == b"picture"
    assert labels_out.read_sidecar(plan, "qc/overview.png") == b"picture"
    assert labels_out.read_sidecar(plan, "qc/missing.png") is None
