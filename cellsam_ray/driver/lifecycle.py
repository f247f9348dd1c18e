"""A run's life on its label: who may write it, what it resumes, when an old result is replaced, how it ends.

Nothing lost, nothing mixed:

- **One writer per label.** A lease beside the label (``driver.lease``) is taken before anything is written
  and released on every way out; a second run on the label is refused with the first one's id and age.
- **A work prefix the run owns.** A user's ``work_dir`` must not be or hold an input, nor lie inside the
  slide outside ``labels/<name>/``. Its owner marker (run id, input, label, fingerprint) is written before
  any result; a prefix owned by another slide or label is refused, and a finished run removes exactly the
  files it writes there (``workstore``), never the prefix.
- **Resume by fingerprint**: the spec's output-changing fields, the weights' content hash, this package's
  version and the input's geometry. A rerun with the same fingerprint continues where the last one
  stopped, ``overwrite`` or not; one that differs is told what differs.
- **An old result stays until the new one is ready to write.** With ``overwrite``, the old label image,
  its report, cell table and QC are untouched while tiles are segmented and persisted; ``swap`` replaces
  them only then, so a failure leaves either the complete old result or a resumable new run.
- **Completion you can trust.** A label image is listed (and marked complete) only once every level is
  written. ``report.json`` says ``running`` from the start and ``succeeded``, ``failed`` or ``stopped`` on
  the way out; while an old result still stands, the new run's report lives in its work prefix instead,
  so the old result's own report keeps describing it.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import fsspec
import ray

from cellsam_ray.driver.lease import Lease
from cellsam_ray.driver.stats import RunStats
from cellsam_ray.errors import UserError
from cellsam_ray.io.ngff import (
    RUN_MARKER,
    NgffImage,
    create_labels,
    label_metadata,
    listed_labels,
    open_image,
    publish_label,
    remove_label_arrays,
)
from cellsam_ray.io.storage import is_local, join_url, local_path
from cellsam_ray.model import geometry
from cellsam_ray.model.config import load_config
from cellsam_ray.pipeline import labels_out
from cellsam_ray.pipeline.plan import SlidePlan
from cellsam_ray.pipeline.workstore import OWNER
from cellsam_ray.report import ActorPool, ModelInfo, RunReport, Summary
from cellsam_ray.version import __version__

# Spec fields that do not change the output, so a resume may differ in them.
RUN_ONLY_FIELDS = {"workers", "gpus_per_worker", "batch_size", "overwrite", "storage_options", "device",
                   "cell_table", "cell_table_h5ad", "outlines", "qc_images", "storage_options_env", "storage_profile",
                   "work_dir", "take_over", "lease_timeout_s", "backup_after_s", "cohort_report", "slides_at_once",
                   "skip_bad_slides"}
LABEL_CREATED = "label-created"  # in the work prefix: the label's arrays are this run's (after the swap)
SIDECARS = ("report.json", "cells.parquet", "cells.h5ad", "cells.geojson", "cells.geoparquet")


def fingerprint(plan: SlidePlan) -> dict:
    """Everything that decides a tile's result, so only a run it matches may resume the finished tiles."""
    spec = plan.spec.model_dump(mode="json", by_alias=True, exclude=RUN_ONLY_FIELDS)
    return {**{f"spec.{k}": v for k, v in spec.items()}, "weights_sha256": plan.weights_sha256,
            "cellsam_ray": __version__, "input": plan.input_fingerprint}


def differences(old: object, new: dict) -> list[str]:
    old = old if isinstance(old, dict) else {}
    return sorted(k.removeprefix("spec.") for k in set(old) | set(new) if old.get(k) != new.get(k))


class LabelRun:
    """This run's hold on ``labels/<name>``: ``start``, then ``swap`` before the first write, then
    ``finish`` or ``end``."""

    def __init__(self, plan: SlidePlan) -> None:
        self.plan = plan
        self.name = plan.spec.label_name
        self.where = f"labels/{self.name} of {plan.spec.input}"
        self.lease = Lease(join_url(plan.spec.input, "labels", f"{self.name}.lease.json"), plan.spec.storage,
                           plan.run_id, plan.spec.lease_timeout_s)
        self.replaces = False  # an old, complete label image stands until the swap

    # ------------------------------------------------------------------------------------------ start
    def start(self) -> None:
        """Check the work location, take the lease, then decide: new run, resume, or refuse."""
        check_work_location(self.plan)
        image = open_image(self.plan.spec.input, self.plan.spec.storage.options(), mode="r+")
        listed_labels(image.group, image.version)  # a listing we could not extend is refused, untouched
        label_metadata(image, self.name)  # so is a label ome-zarr-models would refuse, before any tile is segmented
        self.lease.take(take_over=self.plan.spec.take_over, label=self.where)
        try:
            self._claim(image)
        except BaseException:
            self.lease.release()
            raise
        self.lease.start_heartbeat()

    def _claim(self, image: NgffImage) -> None:
        spec, work = self.plan.spec, self.plan.work
        ours = fingerprint(self.plan)
        owner = work.owner()
        if owner is None and work.has_results():
            raise UserError(f"work_dir {work.url} holds tile results that no run claims (no {OWNER}): give this "
                            "run an empty work_dir of its own; nothing there was touched")
        if owner is not None and (owner.get("input"), owner.get("label")) != (spec.input, self.name):
            raise UserError(f"work_dir {work.url} belongs to the unfinished run of {owner.get('input')} labels/"
                            f"{owner.get('label')}: give each slide and label its own work_dir")
        resumable = owner is not None and owner.get("fingerprint") == ours
        if owner is not None and not resumable:
            changed = ", ".join(differences(owner.get("fingerprint"), ours))
            if not spec.overwrite:
                raise UserError(f"{self.where} has an unfinished run that differs from this one in {changed}: "
                                "rerun with its settings to resume it, or pass --overwrite to discard it")
            work.remove()

        has_group = "labels" in image.group and self.name in image.group["labels"]
        created = resumable and work.read_file(LABEL_CREATED) is not None  # its arrays are our run's
        if complete_label(image, self.name):
            if not spec.overwrite:
                raise UserError(f"labels/{self.name} already exists in {spec.input}: choose another --label-name or "
                                "pass --overwrite (the old labels stay until the new ones are ready to write)")
            self.replaces = True
        elif has_group and not (resumable or spec.overwrite):
            raise UserError(f"{self.where} exists but is incomplete (a run that did not finish wrote it; see its "
                            "report.json): rerun that run's spec to resume it, or pass --overwrite to replace it")

        work.write_file(OWNER, json.dumps(dict(run_id=self.plan.run_id, input=spec.input, label=self.name,
                                               fingerprint=ours), indent=2).encode())
        if not (self.replaces or created):
            self._create_label(image)
        self.write_report(self.plan_report("running"))

    def _create_label(self, image: NgffImage) -> None:
        """Empty label arrays (replacing whatever an unfinished or replaced label left), unlisted."""
        if "labels" in image.group and self.name in image.group["labels"]:
            _remove_old_result(self.plan, image)
        chunks = [self.plan.spec.chunk if a in ("y", "x") else 1 for a in self.plan.axes if a != "c"]
        create_labels(image, self.name, chunks=chunks, run_id=self.plan.run_id)
        self.plan.work.write_file(LABEL_CREATED, self.plan.run_id.encode())

    # ------------------------------------------------------------------------------------------- swap
    def swap(self) -> None:
        """Every tile is segmented and persisted: replace the old result (if any) by the new, empty label."""
        self.lease.check()
        if not self.replaces:
            return
        image = open_image(self.plan.spec.input, self.plan.spec.storage.options(), mode="r+")
        self._create_label(image)
        self.replaces = False
        work_report = self.plan.work.read_file("report.json")
        if work_report is not None:
            labels_out.write_sidecar(self.plan, "report.json", work_report)

    # -------------------------------------------------------------------------------------------- end
    def plan_report(self, status: str, error: str | None = None) -> RunReport:
        return build_report(self.plan, RunStats(), wall_seconds=0.0, status=status, error=error)

    def write_report(self, report: RunReport) -> str:
        """Beside the label, or in the work prefix while an old result still stands. Returns where."""
        data = report.model_dump_json(indent=2).encode()
        if self.replaces:
            self.plan.work.write_file("report.json", data)
            return join_url(self.plan.work.url, "report.json")
        return labels_out.write_sidecar(self.plan, "report.json", data)

    def finish(self, report: RunReport) -> None:
        """Every level, the table and QC are written: the report, then the listing, then the work is gone."""
        self.lease.check()
        self.write_report(report)
        image = open_image(self.plan.spec.input, self.plan.spec.storage.options(), mode="r+")
        publish_label(image, self.name)
        self.plan.work.remove()
        self.lease.release()

    def end(self, report: RunReport) -> str:
        """A run that did not finish: its report (failed or stopped) where it belongs; the lease given back.
        Returns where the report went."""
        try:
            return self.write_report(report)
        finally:
            self.lease.release()


def complete_label(image: NgffImage, name: str) -> bool:
    """Whether ``labels/<name>`` is listed and marked complete: a finished run's result."""
    return name in image.label_names and _marked_complete(image, name)


def _marked_complete(image: NgffImage, name: str) -> bool:
    marker = image.group["labels"][name].attrs.get(RUN_MARKER)
    return not isinstance(marker, dict) or bool(marker.get("complete"))


def _remove_old_result(plan: SlidePlan, image: NgffImage) -> None:
    """The label image's arrays (unlisted first), then its report, cell table and the QC pictures its
    report lists: the files a run of this package writes beside a label, and nothing else there."""
    old_report = labels_out.read_sidecar(plan, "report.json")
    remove_label_arrays(image, plan.spec.label_name)
    qc = []
    try:
        qc = [entry["path"] for entry in (json.loads(old_report or b"{}").get("qc") or {}).get("images", [])]
    except (ValueError, AttributeError, TypeError, KeyError):
        pass
    for relative in list(SIDECARS) + [p for p in qc if isinstance(p, str) and p.startswith("qc/") and ".." not in p]:
        url = labels_out.sidecar_url(plan, *relative.split("/"))
        fs, path = fsspec.core.url_to_fs(url, **(plan.spec.storage.options() or {}))
        if fs.exists(path):
            fs.rm_file(path)


def build_report(plan: SlidePlan, stats: RunStats, *, wall_seconds: float, status: str | None = None,
                 error: str | None = None) -> RunReport:
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
                                               **geometry.describe(plan.grid.window_size,
                                                                  load_config(spec.model_config_name).image_size))
    model = ModelInfo(segmenter=spec.segmenter or "cellsam", weights=None if spec.segmenter else spec.weights,
                      weights_sha256=plan.weights_sha256, config=spec.model_config_name, mode=spec.mode,
                      cell_size=plan.cell_size, **(cellsam or {}))
    return RunReport(
        status=status or ("failed" if stats.failed else "succeeded"),
        run_id=plan.run_id,
        error=error,
        input=spec.input,
        summary=summary,
        spec=spec.model_dump(mode="json", by_alias=True),
        model=model,
        timings={k: round(v, 3) for k, v in stats.stage_seconds.items()},
        tasks=dict(stats.tasks),
        units=dict(stats.units),
        model_seconds=round(stats.model_seconds, 3),
        cell_table=stats.cell_table,
        qc=stats.qc,
        actor_peak_rss_mb=[actor["peak_rss_mb"] for actor in stats.actors],
        nodes=sorted({actor["node"] for actor in stats.actors}),
        pool=_pool(stats),
        actors=stats.actors,
        errors=stats.failed,
        versions=dict(cellsam_ray=__version__, python=platform.python_version(), ray=ray.__version__),
    )


def _pool(stats: RunStats) -> ActorPool | None:
    pool = stats.pool
    if pool is None:
        return None
    return ActorPool(asked=pool.count, each=pool.each, basis=pool.basis, growth=pool.growth, gpus_up=pool.gpus_up,
                     gpus_max=pool.gpus_max, started=len(stats.actors))


# ------------------------------------------------------------------------------------ work location
def location(url: str) -> str:
    """A comparable form of a location: an absolute local path, or scheme://path without trailing '/'."""
    if is_local(url):
        return str(Path(local_path(url)).expanduser().resolve())
    scheme, _, rest = str(url).partition("://")
    return f"{scheme.lower()}://{rest.strip('/')}"


def within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_work_location(plan: SlidePlan) -> None:
    """A user's work_dir must be a place of its own: never an input or a folder holding one (its files are
    written and removed there), and never inside the slide, except under ``labels/<name>/``."""
    spec = plan.spec
    if not spec.work_dir:
        return
    work, slide = location(spec.work_dir), location(spec.input)
    inputs = [("the input slide", spec.input), ("the weights", spec.weights)]
    if (spec.model_config_name or "").endswith(".json"):
        inputs.append(("the model config", spec.model_config_name))
    for what, url in inputs:
        if url and within(location(url), work):
            raise UserError(f"--work-dir {spec.work_dir} is or holds {what} ({url}); a work_dir's files are written "
                            "and removed: give it an empty folder of its own, or leave it out (default: "
                            f"labels/{spec.label_name}/work)")
    if within(work, slide) and not within(work, location(join_url(spec.input, "labels", spec.label_name))):
        raise UserError(f"--work-dir {spec.work_dir} lies inside the input slide {spec.input}: the input is never "
                        f"written; choose a folder outside it, or leave it out (default: labels/{spec.label_name}/work)")
