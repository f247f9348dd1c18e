"""The demo CellSAM shipped inside the package, used when no ``--weights`` are given.

The published weights are licence-gated, so a new user would otherwise have no model at all. This one is
small (input 256² px, patch 8) and was trained by ``cellsam-ray train`` on synthetic images only (seven
styles of ``synth.styles``, any of CellSAM's three channel layouts); its
model card (``assets/MODEL_CARD.md``) gives the training command, data, measured F1 and what it is not
good for. It sees slides at their own resolution: a window is exactly its 256-pixel input, so the
pipeline's tiles for it are a 192-pixel core with a 32-pixel halo (labels chunked by 64).
"""

from __future__ import annotations

from pathlib import Path

from cellsam_ray.errors import UserError
from cellsam_ray.spec import SegmentSpec

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = ASSETS / "demo_cellsam.pt"
CONFIG = ASSETS / "demo_config.json"
MODEL_CARD = ASSETS / "MODEL_CARD.md"
TILE, HALO, CHUNK = 192, 32, 64
"""The whole-slide tiling the bundled model is made for: windows of 192 + 2·32 = 256 pixels."""
DESCRIPTION = f"the bundled demo model ({WEIGHTS.name}, trained on synthetic images only; see {MODEL_CARD})"


def resolve_spec(spec: SegmentSpec) -> SegmentSpec:
    """``spec`` as given when it names weights or a segmenter; else the spec for the bundled model.

    The bundled model also brings its tiling (``TILE``, ``HALO``, ``CHUNK``) for any of those three the
    spec did not set explicitly: the v1.2 tiling (768 + 2·128 stretched to 1024) would shrink every cell
    4× for a model with a 256-pixel input.
    """
    if spec.weights or spec.segmenter:
        return spec
    if "model_config_name" in spec.model_fields_set:
        raise UserError("--config gives the sizes of --weights: give both, or neither for the bundled demo model")
    values = spec.model_dump(by_alias=True) | {"weights": str(WEIGHTS), "config": str(CONFIG)}
    for name, value in (("tile", TILE), ("halo", HALO), ("chunk", CHUNK)):
        if name not in spec.model_fields_set:
            values[name] = value
    return SegmentSpec.model_validate(values)
