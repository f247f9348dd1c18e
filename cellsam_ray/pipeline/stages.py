"""The pipeline's stages as plain functions on plain records; ``execution`` only schedules them.

A: ``segment_tiles`` (model) -> candidates per tile, persisted under the work prefix (resume point);
B: ``reconcile_tile`` -> the cells homed at a tile; C: ids by a prefix sum (driver);
D: ``write_core`` -> a tile's core of label level 0; E: ``pyramid`` chunks, level by level.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cellsam_ray.merge.candidates import tile_candidates
from cellsam_ray.merge.objects import CellSet
from cellsam_ray.merge.rasterise import rasterise_core
from cellsam_ray.merge.reconcile import reconcile_home
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.segmenter import Segmenter, check_detections
from cellsam_ray.tiling import Tile


@dataclass
class TileOutcome:
    """What stage A reports about one tile (the candidates themselves go to the work store)."""

    key: str
    candidates: int
    read_seconds: float
    model_seconds: float


def segment_tiles(plan: SlidePlan, segmenter: Segmenter, tiles: list[Tile], windows: list[np.ndarray]) -> list[tuple[CellSet, TileOutcome]]:
    """Stage A on a batch of already-read windows: run the model, keep each tile's candidates."""
    start = time.perf_counter()
    batch = getattr(segmenter, "segment_batch", None)
    if batch is not None:
        results = batch(windows, origins=[t.origin for t in tiles])
    else:
        results = [segmenter.segment(w, origin=t.origin) for w, t in zip(windows, tiles)]
    per_tile = (time.perf_counter() - start) / max(len(tiles), 1)
    out = []
    for tile, result in zip(tiles, results):
        found = check_detections(result, f"segmenter on tile {tile.key}")
        cells = tile_candidates(found, tile, plan.grid, plan.band)
        out.append((cells, TileOutcome(tile.key, len(cells), 0.0, per_tile)))
    return out


@dataclass
class HomeResult:
    """Stage B's output for one home tile: its kept cells (ids not yet assigned) and QC counters."""

    kept: CellSet
    reconciled: int = 0
    oversized: int = 0
    cut_at_window: int = 0
    extra: dict = field(default_factory=dict)


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


def core_labels(tile: Tile, kept_neighbourhood: list[CellSet]) -> np.ndarray:
    return rasterise_core(tile, kept_neighbourhood)
