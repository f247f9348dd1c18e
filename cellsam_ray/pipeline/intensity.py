"""One intensity normalisation for the whole slide, and the tissue mask, both from a coarse level.

Per-tile statistics (as the published CellSAM tiler uses) let the two sides of a seam see different
images, so the model can disagree with itself across the seam. Here the percentiles are computed once
from a coarse pyramid level and every tile maps its pixels with the same (low, high) per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.8


@dataclass(frozen=True)
class ChannelScale:
    """Maps raw intensities of one channel to [0, 1]: ``clip((x - low) / (high - low), 0, 1)``."""

    low: float
    high: float


def channel_scales(coarse: np.ndarray) -> list[ChannelScale]:
    """Percentiles of each channel's non-zero pixels in a coarse level (C, y, x)."""
    scales = []
    for channel in coarse:
        values = channel[channel > 0]
        if values.size == 0:
            scales.append(ChannelScale(0.0, 1.0))
            continue
        # The float64 copy is ours: the percentiles may reorder it in place rather than copy it again
        low, high = np.percentile(values.astype(np.float64), [LOW_PERCENTILE, HIGH_PERCENTILE], overwrite_input=True)
        if high <= low:
            high = low + 1.0
        scales.append(ChannelScale(float(low), float(high)))
    return scales


def combine_roles(
    pixels: np.ndarray, roles: list[list[int]], scales: list[ChannelScale]
) -> np.ndarray:
    """(n_roles, y, x) float32: each role is the max of its channels after per-channel normalisation.

    ``pixels`` holds the channels named in ``roles`` (indices into ``pixels``' first axis), ``scales``
    the matching normalisations, indexed the same way.
    """
    out = np.zeros((len(roles),) + pixels.shape[1:], dtype=np.float32)
    for r, members in enumerate(roles):
        for i in members:
            s = scales[i]
            scaled = pixels[i].astype(np.float32)  # a copy, worked on in place
            np.subtract(scaled, np.float32(s.low), out=scaled)
            np.divide(scaled, np.float32(s.high - s.low), out=scaled)
            np.maximum(out[r], np.clip(scaled, 0.0, 1.0, out=scaled), out=out[r])
    return out


def tissue_mask(signal: np.ndarray, *, smooth: float = 2.0) -> np.ndarray:
    """Boolean tissue mask of a coarse (y, x) image of normalised signal.

    Otsu's threshold on the smoothed signal separates tissue from glass; a slide with no contrast (all
    background or all tissue) counts as all tissue, so nothing is skipped by mistake.
    """
    # Imported here: only planning needs them, and every worker that unpickles a plan imports this module.
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    smoothed = ndimage.gaussian_filter(signal.astype(np.float32), smooth)
    if float(smoothed.max() - smoothed.min()) < 1e-3:
        return np.ones(signal.shape, dtype=bool)
    threshold = threshold_otsu(smoothed)
    # Dilate so faint cell edges at the tissue border are not skipped.
    return ndimage.binary_dilation(smoothed > threshold * 0.5, iterations=2)
