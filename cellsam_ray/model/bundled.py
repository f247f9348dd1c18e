"""The demo CellSAM shipped inside the package, used when no ``--weights`` are given.

The published weights are licence-gated, so a new user would otherwise have no model at all. This one is
small (input 256² px, patch 8) and was trained by ``cellsam-ray train`` on synthetic images only (seven
styles of ``synth.styles``, any of CellSAM's three channel layouts); its
model card (``assets/MODEL_CARD.md``) gives the training command, data, measured F1 and what it is not
good for. Its own window is its 256-pixel input at the slide's resolution (a 192-pixel core with a
32-pixel halo, labels chunked by 64); ``segment`` sizes its windows to the cells instead (``tiling_for``,
``pipeline.cell_size``), from 128 to 512 pixels, stretched to the input.
"""

from __future__ import annotations

from pathlib import Path

from cellsam_ray.errors import UserError
from cellsam_ray.model.geometry import core_and_halo
from cellsam_ray.spec import SegmentSpec

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = ASSETS / "demo_cellsam.pt"
CONFIG = ASSETS / "demo_config.json"
MODEL_CARD = ASSETS / "MODEL_CARD.md"
TILE, HALO, CHUNK = 192, 32, 64
"""The model's own windows: 192 + 2·32 = 256 pixels, its input, so cells are seen at the slide's resolution."""
CELL_DIAMETER = 20.0
"""The cell diameter (pixels of the model's input) its windows are sized to show (``tiling_for``): smaller
cells get smaller windows and larger cells larger ones, each stretched to the 256-px input. Chosen on
synthetic slides of seeds 700-705 in seven styles (no training, test or card evaluation uses them): pooled
F1 per style was best, and flat within 0.005 on average, for values of 18-21 (model card)."""
WINDOW_STEP, SMALLEST_WINDOW, LARGEST_WINDOW = 64, 128, 512
DESCRIPTION = f"the bundled demo model ({WEIGHTS.name}, trained on synthetic images only; see {MODEL_CARD})"


def tiling_for(diameter: float) -> tuple[int, int, int]:
    """(tile, halo, chunk) of windows that show cells of ``diameter`` slide pixels at about CELL_DIAMETER.

    The window is ``256 · diameter / CELL_DIAMETER`` pixels in steps of 64, from 128 (cells of 10 px or
    less, shown at twice their size; four times the tiles of 256-px windows) to 512 (cells of 40 px or more,
    shown at half their size; cells up to ~130 px then fit in the 64-px halo). It splits as the model's own
    windows do: a halo of an eighth on each side, and three label chunks across the core.
    """
    model_input = TILE + 2 * HALO
    steps = round(model_input * diameter / CELL_DIAMETER / WINDOW_STEP)
    tile, halo = core_and_halo(min(max(steps * WINDOW_STEP, SMALLEST_WINDOW), LARGEST_WINDOW))
    return tile, halo, tile // (TILE // CHUNK)


def of_bundled_sizes(spec: SegmentSpec) -> bool:
    """Whether the spec's model has the bundled model's sizes (the bundled file, or one trained or
    fine-tuned from it, with its config): only such a model's windows follow ``--cell-diameter``."""
    from cellsam_ray.model.config import load_config

    return load_config(spec.model_config_name) == load_config(str(CONFIG))


def resolve_spec(spec: SegmentSpec) -> SegmentSpec:
    """``spec`` as given when it names weights or a segmenter; else the spec for the bundled model.

    The bundled model also brings its tiling for any of ``tile``, ``halo`` and ``chunk`` the spec did not
    set explicitly: the v1.2 tiling (768 + 2·128 stretched to 1024) would shrink every cell 4× for a model
    with a 256-pixel input. With none of them set, its windows follow the cells' size
    (``cell_diameter``, measured by default: ``pipeline.cell_size``); a checkpoint of its sizes follows a
    ``cell_diameter`` the spec gives.
    """
    tiling = [name for name in ("tile", "halo", "chunk") if name in spec.model_fields_set]
    if spec.cell_diameter is not None:
        if spec.segmenter:
            raise UserError("--cell-diameter sizes CellSAM's windows; another --segmenter takes --tile/--halo")
        if tiling:
            raise UserError(f"give --cell-diameter or --{'/--'.join(tiling)}, not both: the cells' size "
                            "chooses the tiling")
    if spec.segmenter or (spec.weights and spec.cell_diameter is None):
        return spec
    if spec.weights:
        if not of_bundled_sizes(spec):
            raise UserError("--cell-diameter sizes the windows of the bundled demo model or a checkpoint of its "
                            "sizes (its config); for these weights choose --scale or --tile/--halo")
        return _sized(spec, spec.model_dump(by_alias=True))
    if "model_config_name" in spec.model_fields_set:
        raise UserError("--config gives the sizes of --weights: give both, or neither for the bundled demo model")
    values = spec.model_dump(by_alias=True) | {"weights": str(WEIGHTS), "config": str(CONFIG)}
    if not tiling:
        return _sized(spec, values | {"cell_diameter": spec.cell_diameter or "auto"})
    for name, value in (("tile", TILE), ("halo", HALO), ("chunk", CHUNK)):
        if name not in tiling:
            values[name] = value
    return SegmentSpec.model_validate(values)


def _sized(spec: SegmentSpec, values: dict) -> SegmentSpec:
    """The spec with the tiling of its cell diameter; 'auto' starts from the model's own windows, which
    ``pipeline.cell_size`` looks through before choosing."""
    diameter = values["cell_diameter"]
    tile, halo, chunk = (TILE, HALO, CHUNK) if diameter == "auto" else tiling_for(diameter)
    return SegmentSpec.model_validate(values | {"tile": tile, "halo": halo, "chunk": chunk})
