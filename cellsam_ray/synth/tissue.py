"""A synthetic multiplexed tissue image, rendered one region at a time.

``TissueModel.render(y0, y1, x0, x1)`` gives the pixels, ground-truth cell labels and nucleus mask of any
rectangle of the slide, bit-identical however the slide is cut into regions (see ``fields``). The image is
formed as a fluorescence microscope would form it:

1. stain: each marker's signal in its compartment (nucleus with chromatin texture, membrane on cell
   borders, cytoplasm, granules, extracellular fibres) in its positive cells, plus tissue autofluorescence;
2. optics: a Gaussian point spread (computed on the region plus a margin, so no seams);
3. illumination: a smooth, uneven field (brighter and dimmer parts of the slide, per-channel variation);
4. detector: photon (Poisson, as its Gaussian limit) and read noise, an offset, 16-bit counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cellsam_ray.synth import fields
from cellsam_ray.synth.cells import TISSUE_THRESHOLD, CellLattice, Sites
from cellsam_ray.synth.markers import Marker, marker_panel

BLUR_SIGMA = 1.1  # px, the point spread
MARGIN = 8  # px rendered around a region: > 4 sigma of the blur + 1 for borders
PHOTONS = 300.0  # photons at full signal: shot noise is ~6% there, more in dim pixels
GAIN = 8.0  # counts per photon
OFFSET = 100.0  # detector offset, counts
READ_NOISE = 6.0  # counts
AUTOFLUORESCENCE = 0.04  # of full signal, in tissue
ILLUMINATION_WAVELENGTH = 1800.0  # px; brightness varies ~0.5-1 over this distance


@dataclass(frozen=True)
class Region:
    """One rendered rectangle: pixels (channels, y, x) uint16, cell ids uint32, nucleus and tissue masks."""

    y0: int
    x0: int
    image: np.ndarray
    labels: np.ndarray
    nuclei: np.ndarray
    tissue: np.ndarray


class TissueModel:
    """A slide of ``shape`` (level-0 pixels) with ``channels`` markers, fully determined by ``seed``."""

    def __init__(self, shape: tuple[int, int], seed: int = 0, channels: int = 3) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.seed = seed
        self.cells = CellLattice(self.shape, seed)
        self.markers: list[Marker] = marker_panel(channels, seed)
        self._key = {name: fields.stream_key(seed, name) for name in (
            "chromatin", "texture", "illumination", "fibre-a", "fibre-b", "fibre-mix")}

    def window(self, marker: Marker) -> tuple[float, float]:
        """A display window (start, end) in counts that shows this marker's positive cells well."""
        top = max(marker.brightness) if marker.compartment != "extracellular" else 0.6
        return OFFSET, OFFSET + GAIN * PHOTONS * top * 0.9

    def render(self, y0: int, y1: int, x0: int, x1: int) -> Region:
        """Render pixels [y0, y1) × [x0, x1) of the slide (inside it)."""
        h, w = self.shape
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"region [{y0}:{y1}, {x0}:{x1}] is not inside the {h}x{w} slide")
        ys, xs = np.arange(y0 - MARGIN, y1 + MARGIN), np.arange(x0 - MARGIN, x1 + MARGIN)
        labels, nucleus, owner, sites = self.cells.render(ys, xs)
        tissue = self.cells.tissue_grid(ys, xs) > TISSUE_THRESHOLD
        cell = labels > 0
        cytoplasm = cell & ~nucleus
        border = cell & _borders(labels)
        chromatin = fields.value_noise(self._key["chromatin"], ys, xs, 3.0)
        texture = fields.value_noise(self._key["texture"], ys, xs, 5.0)

        inner = (slice(MARGIN, MARGIN + y1 - y0), slice(MARGIN, MARGIN + x1 - x0))
        illumination = np.clip(0.75 + 0.8 * (fields.fractal_noise(
            self._key["illumination"], ys[inner[0]], xs[inner[1]], ILLUMINATION_WAVELENGTH, octaves=2) - 0.5),
            0.4, 1.0)
        image = np.empty((len(self.markers), y1 - y0, x1 - x0), np.uint16)
        for c, marker in enumerate(self.markers):
            level = self._expression(c, marker, sites).ravel()[owner] * cell
            if marker.compartment == "nucleus":
                signal = level * nucleus * (0.55 + 0.45 * chromatin)
            elif marker.compartment == "nuclear-speckle":
                speckle = fields.value_noise(self._channel_key(c, "speckle"), ys, xs, 2.2) > 0.6
                signal = level * nucleus * (0.15 + 0.85 * speckle)
            elif marker.compartment == "membrane":
                signal = level * (border + 0.08 * cytoplasm)
            elif marker.compartment == "cytoplasm":
                signal = level * cytoplasm * (0.7 + 0.3 * texture)
            elif marker.compartment == "punctate":
                granules = fields.value_noise(self._channel_key(c, "granules"), ys, xs, 3.0) > 0.7
                signal = level * cytoplasm * (0.1 + 0.9 * granules)
            else:  # extracellular
                signal = 0.6 * (tissue & ~cell) * self._fibres(ys, xs)
            signal = ndimage.gaussian_filter((signal + AUTOFLUORESCENCE * tissue).astype(np.float32), BLUR_SIGMA)
            gain = 0.92 + 0.08 * fields.value_noise(self._channel_key(c, "illumination"), ys[inner[0]],
                                                    xs[inner[1]], ILLUMINATION_WAVELENGTH / 1.5)
            image[c] = self._detect(c, signal[inner] * (illumination * gain), y0, y1, x0, x1)
        return Region(y0=y0, x0=x0, image=image, labels=labels[inner].astype(np.uint32),
                      nuclei=nucleus[inner], tissue=tissue[inner])

    def _expression(self, c: int, marker: Marker, sites: Sites) -> np.ndarray:
        """Per-cell signal of marker ``c`` on the lattice block: 0 for negative cells."""
        i = np.arange(sites.i0, sites.i0 + sites.shape[0])[:, None]
        j = np.arange(sites.j0, sites.j0 + sites.shape[1])[None, :]
        positive = fields.hash_uniform(self._channel_key(c, "positive"), i, j) < np.take(marker.positive, sites.cls)
        amount = 0.6 + 0.4 * fields.hash_uniform(self._channel_key(c, "amount"), i, j)
        return np.where(positive & sites.alive, np.take(marker.brightness, sites.cls) * amount, 0.0)

    def _fibres(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Wavy extracellular fibres: long thin noise along two directions, mixed by a smooth field."""
        y, x = np.meshgrid(ys.astype(np.float64), xs.astype(np.float64), indexing="ij")
        out = 0.0
        mix = fields.value_noise(self._key["fibre-mix"], ys, xs, 150.0)
        for name, (cos, sin), weight in (("fibre-a", (0.8, 0.6), mix), ("fibre-b", (-0.28, 0.96), 1 - mix)):
            along, across = (y * cos + x * sin) / 40.0, (x * cos - y * sin) / 3.0
            strands = fields.value_noise_at(self._key[name], along, across, 1.0)
            out = out + weight * np.clip((strands - 0.45) * 3, 0, 1)
        return out

    def _detect(self, c: int, signal: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Photon and read noise, offset and gain: float signal (1 = full) -> uint16 counts."""
        photons = np.maximum(signal, 0) * PHOTONS
        shot = fields.gaussian_noise(self._channel_key(c, "shot"), y0, y1, x0, x1)
        read = fields.gaussian_noise(self._channel_key(c, "read"), y0, y1, x0, x1)
        counts = OFFSET + GAIN * (photons + np.sqrt(photons) * shot) + READ_NOISE * read
        return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)

    def _channel_key(self, c: int, name: str) -> int:
        return fields.stream_key(self.seed, f"channel-{c}-{name}")


def _borders(labels: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from a 4-neighbour's (the array's own edge does not count)."""
    out = np.zeros(labels.shape, bool)
    vertical = labels[1:] != labels[:-1]
    horizontal = labels[:, 1:] != labels[:, :-1]
    out[1:] |= vertical
    out[:-1] |= vertical
    out[:, 1:] |= horizontal
    out[:, :-1] |= horizontal
    return out
