"""The Python API: ``segment(spec)`` does what ``cellsam-ray segment`` does (the CLI and jobs call it)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import ray

import cellsam_ray
from cellsam_ray import bundled
from cellsam_ray.errors import RunFailed
from cellsam_ray.execution import Progress, RunStats, run_plan
from cellsam_ray.model import geometry
from cellsam_ray.model.config import load_config
from cellsam_ray.pipeline import labels_out
from cellsam_ray.pipeline.plan import SlidePlan, make_plan
from cellsam_ray.report import ModelInfo, RunReport, Summary
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.table.write import require_anndata


class ProgressPrinter:
    """A progress bar on a terminal; structured ``PROGRESS {json}`` lines elsewhere (job logs)."""

    def __init__(self, stream=sys.stderr, every: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self.last = 0.0

    def __call__(self, p: Progress) -> None:
        remaining = p.tiles_total - p.tiles_done
        eta = remaining / p.rate if p.rate > 0 else float("nan")
        if self.tty:
            width = 30
            filled = int(width * p.tiles_done / max(p.tiles_total, 1))
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] tiles {p.tiles_done}/{p.tiles_total}"
                f"  cells {p.cells}  {p.rate:.2f} tiles/s  ETA {eta:.0f}s "
            )
            if remaining == 0:
                self.stream.write("\n")
            self.stream.flush()
        elif time.monotonic() - self.last >= self.every or remaining == 0:
            self.last = time.monotonic()
            line = dict(tiles_done=p.tiles_done, tiles_total=p.tiles_total, candidates=p.cells,
                        tiles_per_s=round(p.rate, 3), eta_s=None if eta != eta else round(eta, 1))
            print("PROGRESS " + json.dumps(line), file=self.stream, flush=True)


def ensure_ray() -> None:
    """Join the cluster the environment names (a Ray job, ``RAY_ADDRESS``), else start a local one."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def segment(spec: SegmentSpec | dict, *, progress: bool = True) -> dict:
    """Segment the slide ``spec`` names and write ``labels/<label_name>`` into it; return the report."""
    spec = spec if isinstance(spec, SegmentSpec) else SegmentSpec.model_validate(spec)
    spec = bundled.resolve_spec(spec)  # no weights and no segmenter: the bundled demo model
    spec = geometry.resolve_spec(spec)  # CellSAM weights: windows from the model's input and --scale
    spec = spec.with_storage_resolved().with_local_paths_absolute()  # workers run in other folders
    if spec.cell_table_h5ad:
        require_anndata()
    started = time.perf_counter()
    plan = make_plan(spec)
    labels_out.prepare(plan)
    ensure_ray()
    stats = run_plan(plan, ProgressPrinter() if progress else None)
    report = build_report(plan, stats, wall_seconds=time.perf_counter() - started)
    if stats.failed:
        labels_out.write_sidecar(plan, "report.json", report.model_dump_json(indent=2).encode())
        shown = "; ".join(f.describe() for f in stats.failed[:3])
        more = f"; and {len(stats.failed) - 3} more" if len(stats.failed) > 3 else ""
        raise RunFailed(f"{len(stats.failed)} tile(s) failed on every attempt: {shown}{more}. The other tiles are "
                        f"kept: rerun the same spec to retry only these (report: {plan.labels_path}/report.json)")
    report = report.model_dump(mode="json")
    labels_out.finish(plan, report)
    return report


def build_report(plan: SlidePlan, stats: RunStats, *, wall_seconds: float) -> RunReport:
    spec = plan.spec
    summary = Summary(
        labels=f"{spec.input.rstrip('/')}/{plan.labels_path}",
        cells=stats.cells,
        tiles=len(plan.grid),
        tiles_segmented=stats.tiles_segmented,
        tiles_resumed=stats.tiles_resumed,
        tiles_skipped_no_tissue=plan.skipped,
        tiles_failed=len(stats.failed),
        seam_reconciliations=stats.reconciled,
        oversized_cells=stats.oversized,
        cells_cut_at_window_edge=stats.cut_at_window,
        level=plan.level,
        cell_table=stats.cell_table["url"] if stats.cell_table else None,
        qc_overview=labels_out.sidecar_url(plan, "qc", "overview.png") if stats.qc else None,
        wall_seconds=round(wall_seconds, 3),
    )
    cellsam = None if spec.segmenter else dict(precision=spec.precision,
                                               **geometry.describe(spec, load_config(spec.model_config_name).image_size))
    model = ModelInfo(segmenter=spec.segmenter or "cellsam", weights=None if spec.segmenter else spec.weights,
                      weights_sha256=plan.weights_sha256, config=spec.model_config_name, mode=spec.mode,
                      **(cellsam or {}))
    return RunReport(
        status="failed" if stats.failed else "succeeded",
        input=spec.input,
        summary=summary,
        spec=spec.model_dump(mode="json", by_alias=True, exclude={"storage_options"}),
        model=model,
        timings={k: round(v, 3) for k, v in stats.stage_seconds.items()},
        model_seconds=round(stats.model_seconds, 3),
        cell_table=stats.cell_table,
        qc=stats.qc,
        actor_peak_rss_mb=stats.actor_peak_rss_mb,
        nodes=stats.nodes,
        errors=stats.failed,
        versions=dict(cellsam_ray=cellsam_ray.__version__, python=platform.python_version(), ray=ray.__version__),
    )
