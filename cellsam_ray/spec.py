"""One description of a segmentation run, shared by the CLI, the Python API and Ray job specs.

Keeping it in one pydantic model means the three can never disagree about a field's name, default or
meaning; ``schemas/job.schema.json`` is generated from it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from cellsam_ray.errors import UserError
from cellsam_ray.io.storage import HOW_TO_PASS_SECRETS, SECRET_OPTIONS, StorageAccess, inline_secret


class SegmentSpec(BaseModel):
    """Everything ``cellsam-ray segment`` takes."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(
        description="URL or path of the OME-Zarr image (local, s3://, gs://, memory://, ...); or a cohort: a list "
        "of them, a glob (s3://bucket/study/*.ome.zarr), a folder of slides, or a manifest (.txt: a URL per "
        "line; .csv: a url column and optional nuclear and whole_cell columns)."
    )
    stain: Literal["fluorescence", "brightfield"] = Field(
        default="fluorescence", description="'fluorescence' (channels named by --nuclear/--whole-cell) or "
        "'brightfield' (H&E, IHC: an RGB image whose colours are the input, no channels named)."
    )
    nuclear: list[str] = Field(
        default_factory=list, validate_default=True,
        description="Nuclear channel(s), by omero name or index (required for fluorescence).",
    )
    whole_cell: list[str] = Field(
        default_factory=list, description="Whole-cell (membrane/cytoplasm) channel(s), by name or index."
    )
    weights: str | None = Field(default=None, description="CellSAM checkpoint: local path or fsspec URL.")
    weights_sha256: str | None = Field(default=None, description="Expected SHA-256 of the checkpoint file.")
    model_config_name: str | None = Field(
        default=None, alias="config", description="Model sizes of --weights: 'v1.2' (the default with --weights) "
        "or a path to a JSON config."
    )
    segmenter: str | None = Field(
        default=None, description="module:attr of another segmenter (then weights are not needed)."
    )
    segmenter_options: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Keyword arguments for --segmenter's factory: option name -> a string, "
        "number, true, false or null (on the command line --segmenter-option KEY=VALUE, repeated). No secrets "
        "(refused): a segmenter that needs one reads it from its node's environment."
    )
    mode: Literal["fast", "reference"] = Field(default="fast", description="CellSAM inference mechanics.")
    precision: Literal["auto", "fp32", "tf32", "bf16"] = Field(
        default="auto", description="Network arithmetic: auto is tf32 on CUDA and fp32 on a CPU (which has no "
        "TF32); bf16 keeps the prompt encoder, the detector's heads and the top-k in fp32."
    )
    scale: Literal["published", "native"] = Field(
        default="published", description="Window size for CellSAM weights: 'published' takes windows of half the "
        "model input (512 px for v1.2, as the published whole-slide pipeline) stretched to it, so cells look 2x "
        "larger; 'native' takes windows of the full input (1024 px), 4x fewer tiles, for large cells. Sets "
        "--tile/--halo/--chunk where not given."
    )
    cell_diameter: float | Literal["auto"] | None = Field(
        default=None, description="The cells' typical diameter in pixels of the segmented level, or 'auto' to "
        "measure it from a first look at a few windows; the bundled demo model's windows (and those of a "
        "checkpoint of its sizes) are then sized so that cells look about 20 px to it. Default: auto for the "
        "bundled model when --tile/--halo/--chunk are not given."
    )
    label_name: str = Field(default="cells", description="Written to labels/<label_name> in the image.")
    level: int | None = Field(default=None, ge=0, description="Pyramid level to segment (default 0).")
    pixel_size: float | None = Field(
        default=None, gt=0, description="Segment the level whose pixel size is closest to this (micrometres)."
    )
    t: int = Field(default=0, ge=0, description="Time point, for images with a t axis.")
    z: int | None = Field(default=None, ge=0, description="Plane, for images with a z axis of size > 1.")
    tile: int | None = Field(default=None, gt=0, description="Tile core size in pixels (a multiple of --chunk). "
                             "Default: from the model (CellSAM weights: --scale, v1.2: 384 published, 768 native; "
                             "the bundled model: the cells' size; another segmenter: 768).")
    halo: int | None = Field(default=None, ge=0, description="Context added on each side of a core. Default: from "
                             "the model (v1.2: 64 published, 128 native; another segmenter: 128).")
    band: int = Field(default=16, ge=0, description="Seam band: detections this far outside a core are reconciled.")
    chunk: int | None = Field(default=None, gt=0, description="Label chunk size at level 0 of the labels. Default: "
                              "from the model (CellSAM weights: the largest divisor of the tile up to 512, v1.2: "
                              "384 for both scales; another segmenter: 256).")
    padding: Literal["zero", "reflect"] = Field(default="zero", description="How windows are padded past borders: "
                                                "'zero' with the background (black; white glass for brightfield), "
                                                "or 'reflect'.")
    tissue_mask: bool = Field(default=True, description="Skip tiles with no tissue (from a coarse level).")
    workers: int | None = Field(default=None, ge=1, description="Model actors (default: one per GPU the cluster "
                                "has or its autoscaler may add, no more than the tiles keep busy; else 1).")
    gpus_per_worker: float = Field(default=1.0, gt=0, description="GPUs per actor when GPUs exist (or the autoscaler "
                                   "can add them); below 1 several "
                                   "actors share a GPU, each limited to that fraction of its memory.")
    cpus_per_worker: float | None = Field(
        default=None, gt=0, description="CPUs per model actor, for its host work (reading windows, cleanup, "
        "candidates); default on GPU nodes: half the node's CPUs per GPU share (the other half runs the merge, "
        "paint and pyramid tasks while the GPUs segment); without GPUs: the cluster's CPUs shared by the actors."
    )
    batch_size: int = Field(default=4, ge=1, description="Tiles per model call.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where the model runs.")
    bbox_threshold: float = Field(default=0.4, ge=0, le=1, description="CellSAM box threshold.")
    storage_options: dict | None = Field(
        default=None, description="fsspec storage options, e.g. {\"endpoint_url\": ...}; no secrets (refused): "
        "use storage_options_env, storage_profile or the machine's own credentials."
    )
    storage_options_env: dict[str, str] | None = Field(
        default=None, description="More storage options, read from environment variables by every process "
        "of the run (the driver and each worker, on its own node): option name -> variable name, e.g. "
        "{\"secret\": \"AWS_SECRET_ACCESS_KEY\"}."
    )
    storage_profile: str | None = Field(
        default=None, description="AWS profile (from ~/.aws) for s3:// storage, passed to s3fs as 'profile'."
    )
    overwrite: bool = Field(default=False, description="Replace an existing labels/<label_name>.")
    cell_table: bool = Field(
        default=True, description="Write labels/<label_name>/cells.parquet: each cell's position, shape, scores "
        "and mean and total intensity in every image channel."
    )
    outlines: bool = Field(
        default=True, description="Write each cell's outline, in level-0 pixels, beside the cell table: "
        "labels/<label_name>/cells.geojson (QuPath's cell objects, the table's columns as measurements) and "
        "cells.geoparquet (GeoPandas, Sopa, SpatialData shapes). On by default with the cell table."
    )
    cell_table_h5ad: bool = Field(
        default=False, description="Also write the cell table as cells.h5ad (AnnData; needs the scverse extra)."
    )
    qc_images: bool = Field(
        default=True, description="Write QC pictures (overview with outlines, busiest tiles, seams) to "
        "labels/<label_name>/qc/."
    )
    work_dir: str | None = Field(
        default=None, description="Where per-tile results live for resuming (default: labels/<label_name>/work); "
        "it must not be or hold the input, and one work_dir serves one slide and label at a time."
    )
    take_over: bool = Field(
        default=False, description="Take the label over from a run whose lease has had no heartbeat for "
        "lease_timeout_s (a run that died without releasing it)."
    )
    lease_timeout_s: float = Field(
        default=600, ge=1, description="Seconds without a heartbeat after which a run's lease on its label "
        "counts as stale (the running driver renews it every lease_timeout_s / 10)."
    )
    cohort_report: str | None = Field(
        default=None, description="Where a cohort run writes its report (a folder: cohort.parquet, one row per "
        "slide, and cohort.html); required when the input names several slides."
    )
    slides_at_once: int = Field(
        default=2, ge=1, description="A cohort's slides in flight at once (planned, segmented or being "
        "finished): the next slide's tiles follow the last one's on the model while it is merged and "
        "pyramided; memory grows with it, not with the cohort's size."
    )
    skip_bad_slides: bool = Field(
        default=False, description="Segment a cohort's other slides when some cannot be read (missing, a "
        "channel one lacks): they are listed in the cohort report. Without it, they are all listed at once "
        "and nothing runs."
    )
    backup_after_s: float = Field(
        default=120, gt=0, description="Once no tiles wait, a call (a batch or several) one model actor has held "
        "this long (and 3x the median call time) is run by an idle actor too: a lost node's actor may never restart, and a "
        "straggler holds the whole run back."
    )

    @field_validator("nuclear")
    @classmethod
    def _nuclear_for_fluorescence(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # ``stain`` is declared first, so it is in ``info.data`` unless it was itself invalid.
        if info.data.get("stain", "fluorescence") == "fluorescence" and not value:
            raise PydanticCustomError("missing", "Field required: name the nuclear channel(s) by name or index "
                                      "(--stain brightfield needs none)")
        return value

    @field_validator("label_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith(".") or value != value.strip():
            raise ValueError(f"label name {value!r} must be a plain name (no '/', not starting with '.')")
        return value

    @property
    def storage(self) -> StorageAccess:
        """How every process of the run reaches storage: resolved where it is used (``storage.options()``),
        so the spec, and every plan that carries it to the workers, holds no credential."""
        return StorageAccess(self.storage_options, self.storage_options_env, self.storage_profile)

    def local_paths(self) -> dict[str, str]:
        """The fields that name a local path (input, weights, work_dir, a JSON config; not a URL, not a
        named size such as "v1.2"), by field name: what every node of a run must reach at that path."""
        paths = {}
        for name in ("input", "weights", "work_dir", "model_config_name", "cohort_report"):
            value = getattr(self, name)
            if not isinstance(value, str) or "://" in value:
                continue
            if name == "model_config_name" and not value.endswith(".json"):
                continue  # a named size ("v1.2"), not a file
            paths[name] = value
        return paths

    def with_local_paths_absolute(self, base: Path | None = None) -> "SegmentSpec":
        """This spec with relative local paths (``local_paths``) made absolute from ``base`` (default: the
        current directory), as they were meant: Ray workers run elsewhere. So is a segmenter option that
        names a file or folder under ``base`` by a relative path (the oracle's labels): options are the
        segmenter's, so only what exists here is taken for a path."""
        base = (base or Path.cwd()).resolve()
        update: dict[str, Any] = {name: str(base / value) for name, value in self.local_paths().items()
                                  if not Path(value).is_absolute()}
        if isinstance(self.input, list):  # a cohort's slides
            update["input"] = [value if "://" in value or Path(value).is_absolute() else str(base / value)
                               for value in self.input]
        options = {name: str(base / value) if _relative_path_under(base, value) else value
                   for name, value in self.segmenter_options.items()}
        if options != self.segmenter_options:
            update["segmenter_options"] = options
        return self.model_copy(update=update)

    @field_validator("cell_diameter", mode="before")
    @classmethod
    def _diameter(cls, value: object) -> object:
        if value is None or value == "auto":
            return value
        try:
            number = float("nan") if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not 0 < number < 10_000:
            raise ValueError(f"{value!r} is not a cell diameter: give a number of pixels above 0, or 'auto'")
        return number

    @model_validator(mode="after")
    def _model_source(self) -> "SegmentSpec":
        if self.level is not None and self.pixel_size is not None:
            raise ValueError("give --level or --pixel-size, not both")
        return self

    @field_validator("segmenter_options", mode="before")
    @classmethod
    def _options_for_a_segmenter(cls, value: object, info: ValidationInfo) -> object:
        # ``segmenter`` is declared first, so it is in ``info.data``.
        if value and not info.data.get("segmenter"):
            raise PydanticCustomError("segmenter_options", "options are keyword arguments for --segmenter's "
                                      "factory: name the segmenter too (--segmenter module:attr)")
        for name, option in value.items() if isinstance(value, dict) else ():
            if not isinstance(option, (str, int, float, bool, type(None))):
                raise PydanticCustomError("segmenter_options", "option {name} is {kind}: an option is a string, "
                                          "a number, true, false or null", dict(name=name, kind=type(option).__name__))
            if str(name).lower() in SECRET_OPTIONS and option not in (None, ""):
                raise PydanticCustomError("segmenter_options", "option {name} holds a secret, which a spec must "
                                          "not: a segmenter that needs one reads it from its node's environment",
                                          dict(name=name))
        return value

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict | None) -> dict | None:
        secret = inline_secret(value)
        if secret:  # the one check, whatever wrote the spec: the command line, a job spec file, the Python API
            raise PydanticCustomError("storage_options", "{secret} holds a secret, which a spec must not: {how}",
                                      dict(secret=secret, how=HOW_TO_PASS_SECRETS))
        return value

    @model_validator(mode="after")
    def _outputs_need_table(self) -> "SegmentSpec":
        if self.cell_table_h5ad and not self.cell_table:
            raise ValueError("--cell-table-h5ad needs the cell table: drop --no-cell-table")
        if self.outlines and not self.cell_table:
            if "outlines" in self.model_fields_set:
                raise ValueError("--outlines needs the cell table (the outlines carry its columns): drop "
                                 "--no-cell-table")
            self.outlines = False  # the default follows the table
        return self


def _relative_path_under(base: Path, value: object) -> bool:
    """Whether ``value`` is a relative path (not a URL) of something that exists under ``base``."""
    if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
        return False
    return (base / value).exists()


def validate_spec(values: dict[str, Any], describe: Callable[[str], str]) -> SegmentSpec:
    """``SegmentSpec`` from ``values``, or a one-line UserError on its first problem.

    ``describe`` turns the failing field's dotted location (``"spec"`` for the whole) into the words the
    user wrote it with: a command-line flag or a place in a job spec file.
    """
    try:
        return SegmentSpec.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise UserError(f"{describe(where)}: {first['msg']}") from None
