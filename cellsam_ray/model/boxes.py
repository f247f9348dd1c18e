"""Which CellFinder boxes prompt SAM, and where they lie in the tile.

CellFinder has no NMS and no fixed score cut: the published code keeps every (query, class) detection
whose score beats a threshold that adapts to the tile. The scores are split into two groups with
2-means, and the cut is ``0.66 * bbox_threshold + 0.33 * mean(group centres)``: a crowded tile of
confident detections raises the bar, a sparse one lowers it. The 2-means is sklearn's KMeans, replayed in
closed form (``two_means``) and asked of sklearn only where rounding could change its answer.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from cellsam_ray.model.preprocess import MODEL_SIZE
from cellsam_ray.model.two_means import VALUE_MARGIN, two_means_centres

BBOX_THRESHOLD = 0.4
"""The published default of ``segment_cellular_image(bbox_threshold=...)``."""


def box_score_threshold(scores: np.ndarray | torch.Tensor, bbox_threshold: float = BBOX_THRESHOLD) -> float:
    """The dynamic score threshold of the published ``generate_bounding_boxes``.

    The 2-means is sklearn's ``KMeans(n_clusters=2, random_state=42)`` (k-means++ start, one run, Lloyd),
    not an exact 1-D 2-means: Lloyd can stop in a local optimum that an exact solver would not. It is
    replayed by :func:`two_means_centres` (microseconds instead of sklearn's ~25 ms for 3,500 scores);
    where that replay cannot vouch for sklearn's decisions, or a score lies within rounding of the
    resulting cut, sklearn itself answers. Where the clustering cannot run (fewer than two scores), the
    threshold is ``bbox_threshold`` itself, the published fallback.
    """
    values = np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float32).reshape(-1)
    if len(values) < 2:  # sklearn refuses fewer samples than clusters
        return float(bbox_threshold)
    centres = two_means_centres(values)
    if centres is not None:
        threshold = 0.66 * bbox_threshold + 0.33 * float(np.mean(centres))
        if np.min(np.abs(values.astype(np.float64) - threshold)) >= VALUE_MARGIN:
            return threshold
    try:
        centres = sklearn_centres(values)
    except ImportError:  # the GPU check's machine: the replay without its rounding guards, else the fallback
        centres = two_means_centres(values, strict=False)
        if centres is None:
            return float(bbox_threshold)
    return 0.66 * bbox_threshold + 0.33 * float(np.mean(centres))


def sklearn_centres(values: np.ndarray) -> np.ndarray:
    """The published clustering itself: sklearn's ``KMeans(n_clusters=2, n_init=1, random_state=42)``."""
    from sklearn.cluster import KMeans  # only for the rare near-tie: ~25 ms, and the GPU check has no sklearn
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Identical scores (e.g. a saturated detector) give one distinct cluster; that is expected.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=2, n_init=1, random_state=42).fit(values.reshape(-1, 1)).cluster_centers_


def confident_boxes(
    scores: torch.Tensor, boxes: torch.Tensor, bbox_threshold: float = BBOX_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scores, boxes) whose score is strictly above ``box_score_threshold``, order kept.

    The comparison is in the scores' float32, as the published tensor comparison is.
    """
    keep = scores > box_score_threshold(scores, bbox_threshold)
    return scores[keep], boxes[keep]


def boxes_to_input_pixels(boxes: torch.Tensor, height: int, width: int, model_size: int = MODEL_SIZE) -> torch.Tensor:
    """Map x1, y1, x2, y2 boxes from the stretched model frame to the tile's (height, width) pixels.

    The stretch is anisotropic, so x and y scale separately. Boxes are not clipped: CellFinder's boxes
    may reach past the frame, and the published ones are reported as they are.
    """
    scale = torch.tensor(
        [width / model_size, height / model_size, width / model_size, height / model_size],
        dtype=boxes.dtype,
        device=boxes.device,
    )
    return boxes * scale
