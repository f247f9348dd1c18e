"""The pipeline's stages as plain functions on plain records; ``execution`` only schedules them.

segment: ``run_model`` (the model, under a worker's model lock) then ``finish_tiles`` (host work: the
   segmenter's own post-processing and the candidates) -> candidates per tile, persisted under the work
   prefix (resume point);
reconcile: ``reconcile_tile`` -> the cells homed at a tile; ids: a prefix sum (driver), ``with_ids``;
paint: ``labels_out.write_core`` -> a tile's core of the segmented label level; pyramid:
   ``labels_out.build_label_chunk``, row by row as the level they are made from fills
   (``driver.streaming`` says when each unit may start).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from cellsam_ray.merge.candidates import tile_candidates
from cellsam_ray.merge.objects import CellSet
from cellsam_ray.merge.reconcile import reconcile_home
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.segmenter import Segmenter, check_detections
from cellsam_ray.tiling import Tile


@dataclass
class TileOutcome:
    """What the segment stage reports about one tile (the candidates themselves go to the work store)."""

    key: str
    candidates: int
    model_seconds: float


@dataclass
class Inferred:
    """A batch after the model: one callable per tile that finishes it on the host, and the model's time."""

    finishers: list[Callable[[], dict]]
    seconds: float


def run_model(segmenter: Segmenter, tiles: list[Tile], windows: list[np.ndarray]) -> Inferred:
    """The part of the segment stage that needs the model. A segmenter with ``infer_batch`` leaves its host work
    to the finishers (CellSAM: hole filling and cutting out the cells); any other answers here."""
    start = time.perf_counter()
    origins = [t.origin for t in tiles]
    infer = getattr(segmenter, "infer_batch", None)
    if infer is not None:
        finishers = infer(windows, origins=origins)
    else:
        batch = getattr(segmenter, "segment_batch", None)
        results = batch(windows, origins=origins) if batch is not None else [
            segmenter.segment(w, origin=o) for w, o in zip(windows, origins)]
        finishers = [partial(_given, result) for result in results]
    return Inferred(finishers, time.perf_counter() - start)


def finish_tiles(plan: SlidePlan, tiles: list[Tile], inferred: Inferred) -> list[tuple[CellSet, TileOutcome]]:
    """The host part of the segment stage, outside any model lock: finish each tile and keep its candidates."""
    start = time.perf_counter()
    found = [check_detections(finish(), f"segmenter on tile {tile.key}")
             for tile, finish in zip(tiles, inferred.finishers)]
    per_tile = (inferred.seconds + time.perf_counter() - start) / max(len(tiles), 1)
    out = []
    for tile, detections in zip(tiles, found):
        cells = tile_candidates(detections, tile, plan.grid, plan.band)
        out.append((cells, TileOutcome(tile.key, len(cells), per_tile)))
    return out


def _given(result: dict) -> dict:
    return result


@dataclass
class HomeResult:
    """The reconcile stage's output for one home tile: its kept cells (ids not yet assigned) and QC counters."""

    kept: CellSet
    reconciled: int = 0
    oversized: int = 0
    cut_at_window: int = 0


def reconcile_tile(home: tuple[int, int], neighbourhood: list[CellSet]) -> HomeResult:
    kept, suppressed = reconcile_home(home, neighbourhood)
    return HomeResult(
        kept=kept,
        reconciled=suppressed,
        oversized=int(np.count_nonzero(kept.col("oversized") > 0)) if len(kept) else 0,
        cut_at_window=int(np.count_nonzero(kept.col("touches_window_edge") > 0)) if len(kept) else 0,
    )


def with_ids(kept: CellSet, offset: int) -> CellSet:
    """The home tile's cells numbered offset+1.., in the centre order ``reconcile_home`` sorted them."""
    numbered = kept.subset(np.arange(len(kept)))
    if len(numbered):
        numbered.set_col("id", offset + np.arange(1, len(numbered) + 1))
    return numbered
