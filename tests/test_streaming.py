"""The stages after segment stream behind the model (issue 13, item 4): while the last tile of a slide is
still on the model, the regions that do not need it are reconciled, painted, pyramided and given their
table rows; the finished run is the same as ever (the ground truth, ids in raster order).

The segmenter is ``cellsam_ray.testing.faults:FaultySegmenter`` holding the last tile until the test releases it,
so "before the last tile" is a fact the test observes, not a race it hopes to win. The rules themselves are
tested on ``driver.streaming.Streams`` directly, without Ray: each unit is handed out once, and only once
what it reads is final.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cellsam_ray.driver import extent
from cellsam_ray.driver.api import segment
from cellsam_ray.driver.streaming import Streams
from cellsam_ray.io.ngff import open_image
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import same_up_to_relabelling
from cellsam_ray.tiling import plan_grid

SIZE = (512, 512)
TILING = dict(tile=128, halo=32, band=8, chunk=64)
GRID = plan_grid(*SIZE, **TILING)  # 4 × 4 tiles


def chunk_rows(level: Path) -> set[int]:
    """The chunk rows (y) that have at least one chunk file in a label level (zarr v3, '/' keys)."""
    return {int(p.relative_to(level).parts[-2]) for p in level.glob("c/**/*") if p.is_file()}


def test_rows_are_written_and_pyramided_while_the_last_tile_is_on_the_model(tmp_path, ray_cluster):
    slide = str(tmp_path / "slide.ome.zarr")
    write_synthetic_slide(slide, size=SIZE, channels=2, ngff="0.5", seed=23, chunk=128)
    faults = tmp_path / "faults"
    last = GRID.tile_at(GRID.rows - 1, GRID.cols - 1)
    # One actor on half a CPU of the 2-CPU test cluster: a CPU is free for the stages after segment meanwhile.
    spec = dict(input=slide, label_name="streamed", nuclear=["DAPI"], segmenter="cellsam_ray.testing.faults:FaultySegmenter",
                segmenter_options=dict(labels=slide, folder=str(faults), hold_at="{},{}".format(*last.origin)),
                tissue_mask=False, batch_size=1, workers=1, cpus_per_worker=0.5, qc_images=False, **TILING)
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(report=segment(spec, progress=False)))
    run.start()
    labels = Path(slide, "labels", "streamed")
    seen: dict = {}
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and run.is_alive():
            held = any((faults / "held").glob("*"))
            seen = {level: chunk_rows(labels / level) for level in ("s0", "s1")}
            if held and {0, 1} <= seen["s0"] and 0 in seen["s1"]:
                break
            time.sleep(0.2)
    finally:
        assert any((faults / "held").glob("*")), "the last tile was never held"
        (faults / "release").touch()
        run.join(timeout=300)
    # Before the last tile left the model: the first tile row's core (chunk rows 0 and 1 of level 0) and
    # the chunk row of level 1 made from it were written; the rows near the held tile were not.
    assert {0, 1} <= seen["s0"] and 0 in seen["s1"], seen
    assert not {6, 7} & seen["s0"], seen

    report = outcome["report"]
    assert report["status"] == "succeeded" and report["summary"]["tiles_segmented"] == 16
    image = open_image(slide)
    truth = np.asarray(image.label("ground_truth").array(0)[:])
    got = np.asarray(image.label("streamed").array(0)[:])
    assert same_up_to_relabelling(got, truth)
    # Ids follow raster order of the homes, as without streaming: 1..N, each once.
    ids = np.unique(got[got > 0])
    assert ids.tolist() == list(range(1, len(ids) + 1))
    table = pq.read_table(labels / "cells.parquet").to_pandas()
    assert table["id"].tolist() == ids.tolist()  # rows streamed in id order
    written = json.loads((labels / "report.json").read_text())
    assert written["units"]["write"] == 16 and written["units"]["reconcile"] == 16  # each core painted once
    assert written["tasks"]["write"] < 16  # neighbouring cores shared a task


def test_a_task_takes_neighbours_of_one_row_at_most_so_many_at_a_time():
    from cellsam_ray.driver.execution import CHUNKS_PER_TASK, HOMES_PER_TASK, _chunk_runs, _runs, homes_per_task

    homes = [(1, 0), (0, 5), (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 7), (1, 1)]
    assert _runs(homes, 4) == [[(0, 0), (0, 1), (0, 2), (0, 3)], [(0, 4), (0, 5)], [(0, 7)], [(1, 0), (1, 1)]]
    chunks = [(1, (0, c)) for c in range(CHUNKS_PER_TASK + 2)] + [(1, (1, 0)), (2, (1, 1))]
    runs = _chunk_runs(chunks, lambda chunk: chunk[0])
    assert [len(r) for r in runs] == [CHUNKS_PER_TASK, 2, 1, 1]  # one level and chunk row per task, at most so many
    # Homes per task by their pixels: CellSAM's native 768-px cores 32 at a time, smaller cores more (to a
    # limit), larger ones fewer (down to one), so a task's memory does not grow with the tile.
    assert homes_per_task(768) == 32 and homes_per_task(256) == HOMES_PER_TASK == 64
    assert homes_per_task(1024) == 18 and homes_per_task(8192) == 1


# The rules of ``Streams`` alone: a 5 × 4 grid of 128² cores; label levels 640×448, 320×224 and 160×112,
# in 64² chunks.
RULES_SIZE = (640, 448)
RULES_TILING = dict(tile=128, halo=32, band=8, chunk=64)


@pytest.fixture(scope="module")
def rules_slide(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("streams") / "slide.ome.zarr")
    write_synthetic_slide(url, size=RULES_SIZE, channels=2, ngff="0.5", seed=29, chunk=128)
    return url


def stream(plan, tiles: list, cells: dict) -> dict:
    """Drive ``Streams`` as ``execution`` does, tile by tile in the order given, finishing every unit as soon
    as it is handed out (the reconciles of one hand-out in reverse), and check as each unit is handed out
    that what it reads is there: the segmented tiles of a home, the offsets of a core's homes, the source
    rows of a chunk (kept, with what was final then, to check once the run shows what was to come)."""
    grid, planned = plan.grid, {t.key for t in plan.tiles}
    streams = Streams(plan, set())
    assert streams.take_writes(9) == [] and streams.take_chunks(9) == []  # nothing before writes open
    streams.open_writes()
    segmented, written, built = set(), [], []
    seen: dict = dict(reconciles=[], rows=[], chunks=[])
    for tile in tiles:
        assert not streams.complete
        segmented.add(tile.key)
        streams.tile_segmented(tile.key)
        while True:
            homes = streams.take_reconciles(3)
            for home in homes:
                needs = {grid.tile_at(*rc).key for rc in grid.neighbourhood(*home)} & planned
                assert needs <= segmented, (home, needs - segmented)
            for home in reversed(homes):
                streams.counted(home, cells.get(home, 0))
            seen["reconciles"] += homes
            writes = streams.take_writes(3)
            for home in writes:
                assert all(rc in streams.offsets for rc in grid.neighbourhood(*home) if rc in streams.active)
                streams.core_written(home, True)
            written += writes
            chunks = streams.take_chunks(5)
            for level, chunk in chunks:
                seen["chunks"].append((level, chunk, set(written), set(built)))
                streams.chunk_built(level, chunk)
                built.append((level, chunk))
            rows = streams.take_table_rows()
            seen["rows"] += rows
            if not (homes or writes or chunks or rows):
                break
    assert streams.complete
    return dict(streams=streams, written=written, built=built, **seen)


def painted_for(plan, cells: dict) -> list:
    """The cores some cell may cover: those with a home holding cells within one tile of them, in raster order."""
    cores = [(r, c) for r in range(plan.grid.rows) for c in range(plan.grid.cols)]
    return [h for h in cores if any(n and max(abs(g[0] - h[0]), abs(g[1] - h[1])) <= 1 for g, n in cells.items())]


def overlaps(a, b) -> bool:
    return all(lo < other_hi and other_lo < hi for (lo, hi), (other_lo, other_hi) in zip(a, b))


CELLS = {(0, 0): 3, (2, 2): 5, (4, 3): 1, (3, 0): 0}  # cells homed per home; any other home keeps none


@pytest.mark.parametrize("order", ["raster", "reversed"])
@pytest.mark.parametrize("tissue", [None, [(0, 0), (0, 1), (3, 3)]])
def test_streams_hand_out_each_unit_once_and_only_once_what_it_reads_is_final(rules_slide, plan_with_labels,
                                                                              order, tissue):
    plan = plan_with_labels(rules_slide, label_name=f"rules-{order}-{bool(tissue)}", **RULES_TILING)
    if tissue:
        plan = replace(plan, tiles=tuple(plan.grid.tile_at(*rc) for rc in tissue))
    homes = extent.active_homes(plan)
    cells = {h: n for h, n in CELLS.items() if h in homes}
    tiles = list(plan.tiles) if order == "raster" else list(reversed(plan.tiles))
    run = stream(plan, tiles, cells)
    streams = run["streams"]
    # Every home that may home a cell is reconciled once; ids are a prefix sum in raster order.
    assert sorted(run["reconciles"]) == homes and len(run["reconciles"]) == len(homes)
    assert streams.offsets == {h: sum(cells.get(g, 0) for g in homes if g < h) for h in homes}
    # Only cores near a home with cells are painted, each once; the table takes them in raster order.
    painted = painted_for(plan, cells)
    assert sorted(run["written"]) == painted and len(run["written"]) == len(painted)
    assert run["rows"] == painted
    assert set(streams.released) == set(homes)  # every home's kept cells were let go by the end
    # The other levels: exactly the chunks made from what was written, each once...
    level1 = extent.chunks_touched(plan, 1, [extent.core_box(plan, plan.grid.tile_at(*h)) for h in painted])
    level2 = extent.chunks_touched(plan, 2, extent.chunk_boxes(plan, 1, level1))
    assert sorted(run["built"]) == [(1, c) for c in level1] + [(2, c) for c in level2]
    # ...each handed out once every region of its source level that it is made from was final.
    for level, chunk, written, built in run["chunks"]:
        box = extent.chunk_boxes(plan, level, [chunk])[0]
        sources = tuple(m.source_span(lo, hi) for m, (lo, hi) in zip(plan.label_maps[level], box))
        if level == 1:
            needed = {h for h in painted if overlaps(extent.core_box(plan, plan.grid.tile_at(*h)), sources)}
            assert needed <= written, (chunk, needed - written)
        else:
            needed = {(1, c) for c in level1 if overlaps(extent.chunk_boxes(plan, 1, [c])[0], sources)}
            assert needed <= built, (chunk, needed - built)


def test_a_resumed_run_reconciles_every_home_at_once(rules_slide, plan_with_labels):
    plan = plan_with_labels(rules_slide, label_name="resumed", **RULES_TILING)
    streams = Streams(plan, {t.key for t in plan.tiles})  # every tile segmented before: nothing to wait for
    assert streams.take_reconciles(100) == [(r, c) for r in range(5) for c in range(4)]
    assert streams.take_reconciles(100) == []
