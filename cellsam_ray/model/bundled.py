"""The demo CellSAM shipped inside the package, used when no ``--weights`` are given.

The published weights are licence-gated, so a new user would otherwise have no model at all. This one is
small (input 256² px, patch 8) and was trained by ``cellsam-ray train`` on synthetic images only (seven
styles of ``synth.styles``, any of CellSAM's three channel layouts); its
model card (``assets/MODEL_CARD.md``) gives the training command, data, measured F1 and what it is not
good for. Its own window is its 256-pixel input at the slide's resolution (a 192-pixel core with a
32-pixel halo, labels chunked by 64); ``segment`` sizes its windows to the cells instead (``tiling_for``,
``driver.windows``), from 128 to 512 pixels, stretched to the input. The facts are here; the decisions
that use them are made in ``driver.windows``.
"""

from __future__ import annotations

from pathlib import Path

from cellsam_ray.errors import UserError
from cellsam_ray.model.geometry import core_and_halo

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # cellsam_ray/assets
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


def of_bundled_sizes(config: str) -> bool:
    """Whether a model config (a preset name or a JSON file) has the bundled model's sizes (the bundled file,
    or one trained or fine-tuned from it, with its config): only such a model's windows follow the cells."""
    from cellsam_ray.model.config import load_config

    return load_config(config) == load_config(str(CONFIG))


def weights_or_bundled(weights: str | None, config: str | None) -> tuple[str, str]:
    """The checkpoint and config to load: those given, v1.2's sizes when only weights are, else the bundled
    model's files (a config alone names the sizes of no weights)."""
    if weights:
        return weights, config or "v1.2"
    if config:
        raise UserError("--config gives the sizes of --weights: give both, or neither for the bundled demo model")
    return str(WEIGHTS), str(CONFIG)
