"""From per-box binary masks to a tile's label image, with the published overlap and cleanup rules."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.ndimage import binary_fill_holes, find_objects

MIN_SIZE = 25
"""Objects smaller than this many pixels are dropped (``segment_cellular_image``'s ``min_size=25``)."""


def paint_masks(masks: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Label image (int32) with mask k (0-based) painted as label k + 1; a later mask wins overlaps.

    This is the published ``max_k(k * mask_k)``. Masks come in descending detector score, so where two
    cells overlap the lower-scored one keeps the pixels. ``masks`` is consumed one at a time, so a caller
    can stream them instead of holding N full-size masks.
    """
    labels = np.zeros(shape, dtype=np.int32)
    for index, mask in enumerate(masks):
        labels[mask] = index + 1
    return labels


def fill_holes_and_remove_small_masks(labels: np.ndarray, min_size: int = MIN_SIZE) -> np.ndarray:
    """Fill each object's holes, drop objects under ``min_size`` pixels and number the rest 1..K.

    Works in place on ``labels`` (and returns it) in ascending label order, exactly as the published
    Cellpose port does, including its order effects: an object's filled holes overwrite any other
    object inside them, and an object's size is counted after earlier objects have been filled, so a
    cell swallowed by an earlier neighbour's hole disappears. ``min_size <= 0`` keeps every object.
    """
    kept = 0
    for index, region in enumerate(find_objects(labels)):
        if region is None:
            continue
        view = labels[region]
        mask = view == index + 1
        size = int(mask.sum())
        if min_size > 0 and size < min_size:
            view[mask] = 0
        elif size > 0:
            kept += 1
            view[binary_fill_holes(mask)] = kept
    return labels
