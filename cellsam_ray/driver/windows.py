"""The run's windows, decided in one place, once, before the run is planned: the core (``tile``), the context
around it (``halo``) and the label chunk.

``plan_run`` is the driver's first step: the model chosen (``choose_model``: the bundled demo model when the
spec names none), the slide surveyed once (``pipeline.plan.survey_slide``), the windows decided
(``decide``), then the one plan (``pipeline.plan.make_plan``). Who decides the windows, in this order:

- the spec: any of ``tile``, ``halo`` and ``chunk`` it gives stays;
- a cell diameter (``--cell-diameter``; 'auto', the bundled model's default, measures it with a first look
  at a few windows, ``driver.cell_size``, or takes the tiling of the unfinished run it resumes), for the
  bundled model or a checkpoint of its sizes: windows that show the cells at about
  ``bundled.CELL_DIAMETER`` (``bundled.tiling_for``);
- the bundled model chosen because the spec named no model: its own windows (``bundled.TILE`` ...);
- CellSAM weights: windows of the model's input over ``--scale`` (``model.geometry.window_geometry``);
- another segmenter: ``OTHER_SEGMENTER``.
"""

from __future__ import annotations

import numpy as np
import ray

from cellsam_ray.driver import cell_size
from cellsam_ray.driver.lifecycle import fingerprint
from cellsam_ray.errors import UserError
from cellsam_ray.model import bundled
from cellsam_ray.model.geometry import window_geometry
from cellsam_ray.pipeline.plan import SlidePlan, SlideSurvey, make_plan, read_overview, survey_slide
from cellsam_ray.report import CellSize
from cellsam_ray.spec import SegmentSpec

TILING = ("tile", "halo", "chunk")
OTHER_SEGMENTER = dict(tile=768, halo=128, chunk=256)
"""Windows for a segmenter that is not CellSAM: 1024 px, CellSAM v1.2's input at its native scale."""


def plan_run(spec: SegmentSpec, *, overview_in_a_task: bool = False) -> SlidePlan:
    """The plan of the run ``spec`` asks for: model chosen, slide surveyed, windows decided, each once.
    ``overview_in_a_task``: the survey's overview is read in a Ray task (``_overview_in_a_task``)."""
    spec, own_windows = choose_model(spec)
    survey = survey_slide(spec, read=_overview_in_a_task if overview_in_a_task else read_overview)
    spec, size = decide(spec, survey, own_windows=own_windows)
    return make_plan(spec, survey, cell_size=size)


# No CPU reserved: one at a time (one planning thread), and a cohort plans while a CPU-only pool holds
# every CPU but CPU_RESERVE, which a reservation would wait for.
_read_overview = ray.remote(max_retries=3, num_cpus=0)(read_overview)


def _overview_in_a_task(*args) -> np.ndarray:
    """``read_overview`` as a Ray task: a cohort plans its next slides while its loop runs, and the survey's
    one large read decodes elsewhere, so the driver's one core stays with the loop. The task reads the slide
    with the storage options its own process resolves (as every worker of a run does). A failure is raised
    as the task raised it."""
    try:
        return ray.get(_read_overview.remote(*args))
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None


def choose_model(spec: SegmentSpec) -> tuple[SegmentSpec, dict[str, int] | None]:
    """``spec`` with its model's files (the bundled demo model when it names no weights and no segmenter), and
    the windows that model brings where the spec named no model and no cell diameter (else None). A
    diameter that cannot size the windows is refused here."""
    given = [name for name in TILING if getattr(spec, name) is not None]
    if spec.cell_diameter is not None:
        if spec.segmenter:
            raise UserError("--cell-diameter sizes CellSAM's windows; another --segmenter takes --tile/--halo")
        if given:
            raise UserError(f"give --cell-diameter or --{'/--'.join(given)}, not both: the cells' size "
                            "chooses the tiling")
    if spec.segmenter:
        return spec, None
    weights, config = bundled.weights_or_bundled(spec.weights, spec.model_config_name)
    if spec.cell_diameter is not None and spec.weights and not bundled.of_bundled_sizes(config):
        raise UserError("--cell-diameter sizes the windows of the bundled demo model or a checkpoint of its "
                        "sizes (its config); for these weights choose --scale or --tile/--halo")
    chosen = spec.model_copy(update=dict(weights=weights, model_config_name=config))
    if spec.weights or spec.cell_diameter is not None:
        return chosen, None
    if not given:  # the bundled model's windows follow the cells unless the spec tiles them
        return chosen.model_copy(update=dict(cell_diameter="auto")), None
    return chosen, dict(tile=bundled.TILE, halo=bundled.HALO, chunk=bundled.CHUNK)


def decide(spec: SegmentSpec, survey: SlideSurvey, *,
           own_windows: dict[str, int] | None = None) -> tuple[SegmentSpec, CellSize | None]:
    """``spec`` with every one of ``tile``, ``halo`` and ``chunk`` set, and how the cells' size chose them
    (None where it did not). ``own_windows``: those of a model the spec did not name (``choose_model``)."""
    if spec.cell_diameter is not None:
        return _sized_to_cells(spec, survey)
    if spec.segmenter:
        fallback = OTHER_SEGMENTER
    elif own_windows:
        fallback = own_windows
    else:
        from cellsam_ray.model.config import load_config  # reads a JSON config: only for CellSAM weights

        fallback = dict(zip(TILING, window_geometry(load_config(spec.model_config_name).image_size, spec.scale)))
    return _filled(spec, fallback), None


def _sized_to_cells(spec: SegmentSpec, survey: SlideSurvey) -> tuple[SegmentSpec, CellSize]:
    """The windows that show the cells at the size the model sees them best: of a given diameter, of the
    unfinished run this one resumes, or of a first look at the cells through the model's own windows."""
    if spec.cell_diameter != "auto":
        return _tiled(spec, bundled.tiling_for(spec.cell_diameter)), CellSize(diameter=spec.cell_diameter,
                                                                              source="given")
    own = make_plan(_tiled(spec, (bundled.TILE, bundled.HALO, bundled.CHUNK)), survey)  # plans, reads nothing
    earlier = _unfinished_tiling(own)
    if earlier is not None:
        return _tiled(spec, earlier), CellSize(source="unfinished run")
    size = cell_size.look(own)
    tiling = bundled.tiling_for(size.diameter) if size.diameter else (bundled.TILE, bundled.HALO, bundled.CHUNK)
    return _tiled(spec, tiling), size


def _unfinished_tiling(plan: SlidePlan) -> tuple[int, int, int] | None:
    """The tiling of the unfinished run in the plan's work prefix, if it differs from this one in nothing
    else: a rerun resumes it without looking again (another machine's arithmetic could differ by a hair)."""
    owner = plan.work.owner()
    theirs = owner.get("fingerprint") if isinstance(owner, dict) else None
    if not isinstance(theirs, dict):
        return None
    tiling = tuple(theirs.get(f"spec.{name}") for name in TILING)
    if not all(isinstance(v, int) for v in tiling):
        return None
    ours = fingerprint(plan) | {f"spec.{name}": value for name, value in zip(TILING, tiling)}
    return tiling if ours == theirs else None


def _tiled(spec: SegmentSpec, tiling: tuple[int, int, int]) -> SegmentSpec:
    return spec.model_copy(update=dict(zip(TILING, tiling)))


def _filled(spec: SegmentSpec, fallback: dict[str, int]) -> SegmentSpec:
    """The spec's own tile, halo and chunk, and ``fallback``'s for those it left unset."""
    return spec.model_copy(update={name: fallback[name] for name in TILING if getattr(spec, name) is None})
