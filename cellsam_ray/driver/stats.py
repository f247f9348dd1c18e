"""What a run counts as it goes: the progress a display shows, and the statistics the report is built from
(``lifecycle.build_report``). ``execution`` updates both as results arrive."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cellsam_ray.driver.capacity import Pool
from cellsam_ray.report import TileFailure


@dataclass
class Progress:
    """What a progress display needs; updated by the driver as results arrive."""

    tiles_total: int
    tiles_done: int = 0
    tiles_resumed: int = 0
    cells: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def rate(self) -> float:
        return (self.tiles_done - self.tiles_resumed) / max(time.perf_counter() - self.started, 1e-9)


@dataclass
class RunStats:
    tiles_segmented: int = 0
    tiles_resumed: int = 0
    candidates: int = 0
    cells: int = 0
    reconciled: int = 0
    oversized: int = 0
    cut_at_window: int = 0
    model_seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    cell_table: dict | None = None  # where the table went, its rows and columns
    qc: dict | None = None  # the QC pictures written
    pool: Pool | None = None  # the model actors asked for, and why
    actors: list = field(default_factory=list)  # per model actor that answered at the end: node, GPUs, device, memory
    tasks: dict = field(default_factory=dict)  # tasks (or actor calls) per stage
    units: dict = field(default_factory=dict)  # per stage: homes reconciled, cores painted, chunks built, ...
    batches: int = 0  # model batches handed to the actors
    calls: int = 0  # actor calls that carried them
    failed: list[TileFailure] = field(default_factory=list)
