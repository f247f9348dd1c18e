"""The marker panel of a synthetic slide: what each channel stains, and in which cells.

Channel 0 is always DAPI (nuclei), channel 1 a membrane marker on every cell (strongest on epithelium; it
stands in for a pan-membrane stain, so a whole-cell segmenter has borders everywhere), channel 2 a
cytoplasmic epithelial marker. Further channels follow a fixed, plausible multiplex panel, each with its
own compartment and positive subset; past the panel, extra markers are generated from the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from cellsam_ray.synth import fields

Compartment = Literal["nucleus", "nuclear-speckle", "membrane", "cytoplasm", "punctate", "extracellular"]


@dataclass(frozen=True)
class Marker:
    """One channel: its stain's compartment, per-class (immune, stromal, epithelial) positive fraction and
    brightness of positive cells (0..1 of the full signal)."""

    name: str
    compartment: Compartment
    color: str
    positive: tuple[float, float, float] = (0.0, 0.0, 0.0)
    brightness: tuple[float, float, float] = (1.0, 1.0, 1.0)


PANEL: tuple[Marker, ...] = (
    Marker("DAPI", "nucleus", "0000FF", (1.0, 1.0, 1.0), (0.95, 0.7, 0.8)),
    Marker("E-cadherin", "membrane", "00FF00", (1.0, 1.0, 1.0), (0.35, 0.3, 1.0)),
    Marker("Pan-Cytokeratin", "cytoplasm", "FF0000", (0.0, 0.03, 0.95), (0.5, 0.5, 0.9)),
    Marker("CD45", "membrane", "FFFF00", (0.95, 0.08, 0.0), (0.9, 0.6, 0.6)),
    Marker("Ki-67", "nuclear-speckle", "FF00FF", (0.15, 0.05, 0.3), (0.9, 0.9, 0.9)),
    Marker("Vimentin", "cytoplasm", "00FFFF", (0.3, 0.95, 0.05), (0.5, 0.9, 0.4)),
    Marker("CD68", "punctate", "FF8000", (0.12, 0.1, 0.0), (1.0, 1.0, 1.0)),
    Marker("Collagen-I", "extracellular", "C0C0C0"),
    Marker("CD3", "membrane", "80FF00", (0.6, 0.02, 0.0), (0.8, 0.5, 0.5)),
    Marker("CD8", "membrane", "FF0080", (0.3, 0.0, 0.0), (0.9, 0.5, 0.5)),
    Marker("CD20", "membrane", "0080FF", (0.25, 0.0, 0.0), (0.8, 0.5, 0.5)),
    Marker("SMA", "cytoplasm", "8000FF", (0.0, 0.4, 0.0), (0.5, 0.9, 0.5)),
)

_GENERATED_COMPARTMENTS: tuple[Compartment, ...] = ("membrane", "cytoplasm", "nucleus", "punctate")


def marker_panel(channels: int, seed: int = 0) -> list[Marker]:
    """The first ``channels`` markers: the fixed panel, then generated ones ("Marker-13", ...)."""
    if channels < 1:
        raise ValueError("a slide has at least one channel")
    markers = list(PANEL[:channels])
    key = fields.stream_key(seed, "generated-markers")
    for index in range(len(PANEL), channels):
        u = fields.hash_uniform(key, np.arange(4), np.array(index))
        hue = _hex_colour(u[3])
        markers.append(Marker(
            name=f"Marker-{index + 1}",
            compartment=_GENERATED_COMPARTMENTS[index % len(_GENERATED_COMPARTMENTS)],
            color=hue,
            positive=(float(0.05 + 0.6 * u[0]), float(0.05 + 0.6 * u[1]), float(0.05 + 0.6 * u[2])),
            brightness=(0.8, 0.8, 0.8),
        ))
    return markers


def _hex_colour(u: float) -> str:
    """A saturated colour from a hue in [0, 1)."""
    sector, t = divmod(float(u) * 6, 1)
    up, down = round(255 * t), round(255 * (1 - t))
    r, g, b = [(255, up, 0), (down, 255, 0), (0, 255, up), (0, down, 255), (up, 0, 255), (255, 0, down)][int(sector)]
    return f"{r:02X}{g:02X}{b:02X}"
