"""The run report, ``labels/<name>/report.json``: what was run, on what, how it went.

One pydantic model, so the report ``segment`` returns, the file it writes and the published schema
(``schemas/report.schema.json``, generated from ``RunReport``) cannot drift apart. A run writes it when it
starts (``status: running``) and on every way out: ``succeeded``, ``failed`` (with the error, and each
tile that failed and why) or ``stopped``. A run killed outright leaves ``running``; its label image is
not listed, so no reader takes it for finished.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cellsam_ray.tiling import Tile


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Summary(_Strict):
    """The numbers a user looks at first (printed by ``cellsam-ray segment``)."""

    labels: str = Field(description="URL of the label image written.")
    cells: int = Field(description="Cells in the label image (ids 1..cells).")
    tiles: int = Field(description="Tiles in the grid.")
    tiles_segmented: int = Field(description="Tiles the model ran on in this run.")
    tiles_resumed: int = Field(description="Tiles finished by an earlier run of the same spec, not recomputed.")
    tiles_skipped_no_tissue: int = Field(description="Tiles without tissue, never segmented.")
    tiles_failed: int = Field(default=0, description="Tiles that failed on every attempt (the run then fails).")
    seam_reconciliations: int = Field(description="Copies of a cell from two tiles settled at a seam.")
    oversized_cells: int = Field(description="Cells larger than the halo (they may be cut).")
    cells_cut_at_window_edge: int = Field(description="Cells that touch their window's edge.")
    level: int = Field(description="Pyramid level segmented.")
    cell_table: str | None = Field(default=None, description="URL of the cell table, if written.")
    qc_overview: str | None = Field(default=None, description="URL of the QC overview picture, if written.")
    wall_seconds: float = Field(description="Wall time of the run, planning included.")


class TileFailure(_Strict):
    """A tile that failed on every attempt; its coordinates are in pixels of the segmented level."""

    tile: str = Field(description="The tile's key (r<row>_c<col>), as in the work prefix.")
    row: int
    col: int
    core: tuple[int, int, int, int] = Field(description="The tile's core: y0, x0, y1, x1 (half-open).")
    error: str = Field(description="The last error, one line.")

    @classmethod
    def of(cls, tile: Tile, error: str) -> "TileFailure":
        return cls(tile=tile.key, row=tile.row, col=tile.col,
                   core=(tile.core_y0, tile.core_x0, tile.core_y1, tile.core_x1), error=error)

    def describe(self) -> str:
        y0, x0, y1, x1 = self.core
        return f"tile {self.tile} (rows {y0}..{y1}, columns {x0}..{x1}): {self.error}"


class CellSize(_Strict):
    """How the windows were sized to the cells (``cell_diameter``; ``driver.cell_size``)."""

    diameter: float | None = Field(default=None, description="The cells' typical diameter the windows were sized "
                                   "for, px of the segmented level: given, or the median of those measured; null "
                                   "when too few were found to measure (the model's own windows then).")
    source: Literal["given", "measured", "unfinished run"] = Field(
        description="'given' (--cell-diameter N), 'measured' (a first look at a few windows) or 'unfinished run' "
        "(the tiling of the run this one resumes)."
    )
    cells: int | None = Field(default=None, description="Whole cells measured.")
    windows: int | None = Field(default=None, description="Windows looked at.")
    look: int | None = Field(default=None, description="Side of the windows of the look measured by, px.")

    def describe(self) -> str:
        if self.source == "unfinished run":
            return "the tiling of the unfinished run it resumes"
        if self.source == "given":
            return f"cells of {self.diameter:g} px as given"
        if self.diameter is None:
            return f"too few whole cells to measure ({self.cells} in {self.windows} windows): the model's own windows"
        return (f"median diameter {self.diameter:g} px over {self.cells} whole cells in {self.windows} windows of "
                f"{self.look} px")


class ModelInfo(_Strict):
    segmenter: str = Field(description="'cellsam', or the module:attr of another segmenter.")
    weights: str | None = Field(description="The checkpoint's URL.")
    weights_sha256: str | None = Field(
        description="The checkpoint's SHA-256: as given, or computed for a local file; null for a remote "
        "checkpoint given without one."
    )
    config: str | None = Field(description="Model sizes ('v1.2' or a JSON config); null for another segmenter.")
    mode: str = Field(description="CellSAM inference mechanics.")
    precision: str | None = Field(default=None, description="Network arithmetic asked for (auto: tf32 on CUDA, "
                                  "fp32 on a CPU).")
    window: int | None = Field(default=None, description="Side of the slide window each tile's model call sees, px.")
    model_input: int | None = Field(default=None, description="Side of the model's input the window is stretched to.")
    scale: str | None = Field(default=None, description="'published' (window = half the model input, as the "
                              "published whole-slide pipeline), 'native' (window = input) or 'custom'.")
    cell_size: CellSize | None = Field(default=None, description="How the windows were sized to the cells (the "
                                       "bundled model's --cell-diameter); null when the tiling was set otherwise.")


class ActorPool(_Strict):
    """The model actors a run asked for, what each held, and why: the GPUs up, what the autoscaler may add."""

    asked: int = Field(description="Model actors asked for.")
    each: dict[str, float] = Field(description="What each asked for: GPU (a share below 1) and CPU.")
    basis: str = Field(description="Why, one line: the GPUs up, the GPU nodes the autoscaler may add, or no GPU "
                       "now or by scaling (then CPUs).")
    growth: Literal["none", "config", "probe"] = Field(
        description="How the autoscaler was read: 'none' (no autoscaler that adds node types), 'config' (the node "
        "groups it reported) or 'probe' (whether it launched nodes when asked for one GPU actor).")
    gpus_up: float = Field(description="GPUs on the nodes that were up when the run started.")
    gpus_max: float | None = Field(description="GPUs the cluster may scale to (0: none; null: as many as its "
                                   "autoscaler may add, which it does not say, or not asked with --device cpu).")
    started: int = Field(description="Actors that started and answered at the end (those that never found room "
                         "are not counted).")


class ActorInfo(_Strict):
    """Where one model actor ran."""

    node: str = Field(description="Its Ray node id.")
    gpus: list[str] = Field(description="The GPU ids Ray gave it (its CUDA_VISIBLE_DEVICES); empty on CPUs.")
    device: str | None = Field(description="Where its model ran ('cuda', 'cpu'); null for a segmenter that does "
                               "not say.")
    peak_rss_mb: float = Field(description="Its peak memory.")


class RunReport(_Strict):
    status: Literal["running", "succeeded", "failed", "stopped"]
    run_id: str = Field(description="This run's id (as in the label's lease and the work prefix's owner marker).")
    error: str | None = Field(default=None, description="Why the run failed or stopped, one line.")
    input: str = Field(description="URL of the image segmented.")
    summary: Summary
    spec: dict = Field(description="The job spec, storage options left out.")
    model: ModelInfo
    timings: dict[str, float] = Field(description="Seconds per stage (segment, reconcile, write, pyramid, ...).")
    tasks: dict[str, int] = Field(default_factory=dict, description="Ray tasks per stage (model batches "
                                  "for segment, and the actor calls that carried them): after segmenting they follow the tissue, not the slide's area.")
    units: dict[str, int] = Field(default_factory=dict, description="Units of work per stage, a task taking "
                                  "several neighbours: homes reconciled, cores painted (written or found "
                                  "empty), pyramid chunks built, homes whose table rows were made.")
    model_seconds: float = Field(description="Seconds spent inside the model, summed over actors.")
    actor_peak_rss_mb: list[float] = Field(default_factory=list, description="Peak memory of each model actor.")
    nodes: list[str] = Field(default_factory=list, description="Ray node ids the model actors ran on.")
    pool: ActorPool | None = Field(default=None, description="The model actors asked for and started (null when "
                                   "every tile was already segmented).")
    actors: list[ActorInfo] = Field(default_factory=list, description="Each model actor that answered at the end: "
                                    "its node, GPUs and device.")
    cell_table: dict | None = Field(default=None, description="Where the cell table went, its rows and columns.")
    qc: dict | None = Field(default=None, description="The QC pictures written.")
    errors: list[TileFailure] = Field(default_factory=list, description="Tiles that failed on every attempt.")
    versions: dict[str, str] = Field(description="cellsam_ray, python and ray versions.")
