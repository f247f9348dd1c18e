"""The segmenter contract: what any per-window model hands to the merge.

A segmenter is an object with ``segment(window, *, origin) -> dict``:

- ``window``: float32 array (C, H, W), the slide's normalised channels in role order (nuclear,
  whole-cell; with ``--stain brightfield`` a blank nuclear channel and the RGB's grey); ``origin`` is the window's top-left (y, x) in pixels of the processed level (negative
  where the window reaches past the image's top or left border, where it is padded).
- the result holds ``boxes`` (N×4 float, x1, y1, x2, y2 in window pixels), ``scores`` (N floats) and
  ``masks`` (N boolean arrays; mask i covers box i rounded outward to whole pixels: rows
  floor(y1)..ceil(y2)-1 and columns floor(x1)..ceil(x2)-1, and may reach past the window edge, where
  it is False). Optional ``ious`` (N floats, the model's predicted mask quality) refine the ranking
  used at seams.

A segmenter may also have ``infer_batch(windows, *, origins)`` returning one callable per window that
gives its result: the model actors call ``infer_batch`` under their model lock and the callables after
releasing it, so a segmenter's host-only post-processing overlaps the next batch's model time
(``cellsam_ray.model.cellsam`` does). ``--segmenter module:attr`` names a class or factory that builds
one, called with the spec's ``segmenter_options`` (``--segmenter-option KEY=VALUE``) as keyword arguments:
its settings travel in the spec to every model actor, and enter the resume fingerprint, so a run with other
settings never resumes tiles made with the old ones. The merge treats every segmenter the same way, CellSAM
included.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cellsam_ray.errors import UserError


class Segmenter(Protocol):
    def segment(self, window: np.ndarray, *, origin: tuple[int, int]) -> dict[str, Any]: ...


@dataclass
class Detections:
    """A segmenter's result for one window, checked against the contract."""

    boxes: np.ndarray  # (N, 4) float64, x1 y1 x2 y2 in window pixels
    scores: np.ndarray  # (N,) float64
    ious: np.ndarray  # (N,) float64; 0 where the segmenter gives none
    masks: list[np.ndarray]  # N bool arrays covering each box rounded outward

    def __len__(self) -> int:
        return len(self.scores)


def check_detections(result: dict[str, Any], source: str) -> Detections:
    """Validate a segmenter's result; a broken segmenter fails loudly here, not as a corrupt slide."""
    try:
        boxes = np.asarray(result["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(result["scores"], dtype=np.float64).reshape(-1)
        masks = list(result["masks"])
    except (KeyError, TypeError, ValueError) as err:
        raise RuntimeError(f"{source}: result must hold boxes (N×4), scores (N) and masks: {err}") from err
    n = len(boxes)
    ious = np.asarray(result.get("ious", np.zeros(n)), dtype=np.float64).reshape(-1)
    if not (len(scores) == len(masks) == len(ious) == n):
        raise RuntimeError(
            f"{source}: {n} boxes but {len(scores)} scores, {len(ious)} ious and {len(masks)} masks"
        )
    if not np.all(np.isfinite(boxes)) or np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise RuntimeError(f"{source}: boxes must be finite x1, y1, x2, y2 with x2 >= x1 and y2 >= y1")
    checked = [np.asarray(mask) for mask in masks]
    shapes = np.array([m.shape if m.ndim == 2 else (-1, -1) for m in checked], dtype=np.int64).reshape(-1, 2)
    expected = np.stack([np.ceil(boxes[:, 3]) - np.floor(boxes[:, 1]),
                         np.ceil(boxes[:, 2]) - np.floor(boxes[:, 0])], axis=1).astype(np.int64)
    wrong = np.flatnonzero((shapes != expected).any(axis=1))
    if wrong.size:
        i = int(wrong[0])
        raise RuntimeError(
            f"{source}: mask {i} has shape {checked[i].shape}, but box {boxes[i].tolist()} rounded outward "
            f"covers {tuple(expected[i].tolist())}"
        )
    checked = [m if m.dtype == bool else m.astype(bool) for m in checked]
    return Detections(boxes=boxes, scores=scores, ious=ious, masks=checked)


def segmenter_factory(spec: str, options: dict[str, Any]) -> Any:
    """The class or factory named ``module:attr``, not yet called, once ``options`` are known to fit it: the
    plan checks both before any actor starts (a misspelt option would otherwise fail every actor), and each
    actor builds its own segmenter from it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--segmenter must look like module:attr, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--segmenter {spec}: cannot import {module_name!r} ({err})") from err
    factory = getattr(module, attr, None)
    if factory is None:
        raise UserError(f"--segmenter {spec}: module {module_name!r} has no attribute {attr!r}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (a builtin): a wrong option fails in the actors
        return factory
    try:
        signature.bind(**options)
    except TypeError as err:
        takes = [p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise UserError(f"--segmenter {spec}: its options do not fit it: {err} (it takes: "
                        f"{', '.join(takes) or 'no options'})") from None
    return factory


def load_segmenter(spec: str, options: dict[str, Any]) -> Segmenter:
    """Build the segmenter named ``module:attr``: its class or factory called with ``options`` as keyword
    arguments."""
    segmenter = segmenter_factory(spec, options)(**options)
    if not callable(getattr(segmenter, "segment", None)):
        raise UserError(f"--segmenter {spec}: the object it builds has no segment(window, *, origin) method")
    return segmenter
