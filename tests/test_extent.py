"""``driver.extent`` on its own (no Ray, no run): which homes, cores and chunks the work after segmenting
touches, read from the plan alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cellsam_ray.driver import extent
from cellsam_ray.pipeline import labels_out
from cellsam_ray.synth import write_synthetic_slide

# A 5 × 4 grid whose last column of cores is 64 wide; label levels 640×448, 320×224, 160×112 in 64² chunks.
SIZE = (640, 448)
TILING = dict(tile=128, halo=32, band=8, chunk=64)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("extent") / "slide.ome.zarr")
    write_synthetic_slide(url, size=SIZE, channels=2, ngff="0.5", seed=5, chunk=128)
    return url


@pytest.fixture
def plan(slide, plan_with_labels, request):
    return plan_with_labels(slide, label_name=request.node.name.replace("[", "-").strip("]"), **TILING)


def around(rows: int, cols: int, row: int, col: int) -> set[tuple[int, int]]:
    """The tiles within one step of (row, col), diagonals included, inside a rows × cols grid."""
    return {(r, c) for r in range(rows) for c in range(cols) if abs(r - row) <= 1 and abs(c - col) <= 1}


@pytest.mark.parametrize("planned", [[(0, 0)], [(2, 1)], [(4, 3), (0, 3)], []])
def test_only_homes_next_to_a_segmented_tile_are_reconciled(plan, planned):
    grid = plan.grid
    assert (grid.rows, grid.cols) == (5, 4)
    tissue = replace(plan, tiles=tuple(grid.tile_at(*rc) for rc in planned))  # the other tiles hold no tissue
    expected = sorted(set().union(*(around(5, 4, *rc) for rc in planned)))
    assert extent.active_homes(tissue) == expected


def test_every_home_is_reconciled_when_every_tile_is_segmented(plan):
    assert extent.active_homes(plan) == [(r, c) for r in range(5) for c in range(4)]


def test_a_core_box_is_the_core_in_the_chosen_plane(plan):
    grid = plan.grid
    assert extent.core_box(plan, grid.tile_at(1, 2)) == ((128, 256), (256, 384))
    assert extent.core_box(plan, grid.tile_at(4, 3)) == ((512, 640), (384, 448))  # cut at the image's edge
    stack = replace(plan, axes=("t", "c", "z", "y", "x"), plane={"t": 1, "z": 2})
    assert extent.core_box(stack, grid.tile_at(0, 3)) == ((1, 2), (2, 3), (0, 128), (384, 448))


def test_chunks_touched_are_those_made_from_the_given_regions(plan):
    # Level 1 halves level 0: its 64² chunk covers 128² of level 0, one core.
    assert extent.chunks_touched(plan, 1, [((128, 256), (128, 256))]) == [(1, 1)]
    assert extent.chunks_touched(plan, 1, [((512, 640), (384, 448))]) == [(4, 3)]
    assert extent.chunks_touched(plan, 1, [((100, 140), (0, 10))]) == [(0, 0), (1, 0)]  # straddles two rows
    assert extent.chunks_touched(plan, 1, [((10, 10), (0, 64))]) == []  # an empty region makes nothing
    # Regions sharing chunks name each once, in grid order; level 2 is made from level 1.
    assert extent.chunks_touched(plan, 1, [((300, 400), (0, 300)), ((0, 1), (0, 1))]) == \
        [(0, 0), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
    assert extent.chunks_touched(plan, 2, [((128, 192), (192, 224))]) == [(1, 1)]


def test_chunk_boxes_tile_the_level(plan):
    assert extent.chunk_boxes(plan, 2, [(2, 1), (0, 0)]) == [((128, 160), (64, 112)), ((0, 64), (0, 64))]
    for level, shape in enumerate(plan.label_shapes):
        covered = np.zeros(shape, np.int32)
        for (y0, y1), (x0, x1) in extent.chunk_boxes(plan, level, labels_out.chunk_indices(plan, level)):
            covered[y0:y1, x0:x1] += 1
        assert (covered == 1).all()  # every pixel in exactly one chunk


def test_chunks_left_out_hold_nothing_even_when_built(plan):
    """The promise the schedule relies on: building every chunk of level 1 from a level 0 with some cores
    written puts labels only in the chunks ``chunks_touched`` names for those cores."""
    grid = plan.grid
    written = [grid.tile_at(0, 0), grid.tile_at(2, 3), grid.tile_at(4, 1)]
    for k, tile in enumerate(written, start=1):
        labels_out.write_core(plan, tile, np.full((tile.core_y1 - tile.core_y0, tile.core_x1 - tile.core_x0), k,
                                                  np.uint32))
    for index in labels_out.chunk_indices(plan, 1):
        labels_out.build_label_chunk(plan, 1, index)
    level1 = labels_out.label_arrays(plan)[1][:]
    holding = [index for index, ((y0, y1), (x0, x1)) in zip(labels_out.chunk_indices(plan, 1), extent.chunk_boxes(
        plan, 1, labels_out.chunk_indices(plan, 1))) if level1[y0:y1, x0:x1].any()]
    assert holding == extent.chunks_touched(plan, 1, [extent.core_box(plan, t) for t in written])
    assert holding == [(0, 0), (2, 3), (4, 1)]
