"""A segmenter that answers with known cells: the ground truth, as a model would see it through a window.

It exists to prove the merge (and to check a deployment end to end) without a model: for each window it
returns every known cell visible in the window, truncated at the window's edge, with its box grown by a
random 0..``jitter`` pixels on each side so that neighbouring windows disagree about box centres the way a
real model's windows do. The jitter is seeded by the cell id and the window origin, so runs repeat.

Its cells are ``labels``: a label array (in this process), or, as a ``--segmenter`` takes them from the
spec's ``segmenter_options`` (``--segmenter-option labels=URL``), the path of a ``.npy`` label image or the
URL of an OME-Zarr image whose ``labels/ground_truth`` it reads (at ``level``, default 0) window by window.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage


class GroundTruthSegmenter:
    def __init__(self, labels: np.ndarray | str, *, level: int = 0, jitter: int = 3) -> None:
        self.labels = _read_labels(labels, level) if isinstance(labels, str) else labels
        self.jitter = jitter

    def segment(self, window: np.ndarray, *, origin: tuple[int, int]) -> dict[str, Any]:
        size_y, size_x = window.shape[-2:]
        oy, ox = origin
        h, w = self.labels.shape
        # The part of the window inside the image, and the labels seen there.
        y0, x0 = max(oy, 0), max(ox, 0)
        y1, x1 = min(oy + size_y, h), min(ox + size_x, w)
        view = np.zeros((size_y, size_x), dtype=self.labels.dtype)
        if y1 > y0 and x1 > x0:
            view[y0 - oy : y1 - oy, x0 - ox : x1 - ox] = np.asarray(self.labels[y0:y1, x0:x1])
        boxes, scores, masks = [], [], []
        # Number the visible cells 1..K locally so find_objects does not scale with the global ids.
        ids, local = np.unique(view, return_inverse=True)
        local = local.reshape(view.shape)
        if ids[0] != 0:
            ids, local = np.concatenate([[0], ids]), local + 1
        for index, slices in enumerate(ndimage.find_objects(local)):
            if slices is None:
                continue
            cell_id = ids[index + 1]
            rng = np.random.default_rng([int(cell_id), oy + 2**20, ox + 2**20])
            grow = rng.integers(0, self.jitter + 1, size=4)
            r0, r1 = slices[0].start - grow[0], slices[0].stop + grow[1]
            c0, c1 = slices[1].start - grow[2], slices[1].stop + grow[3]
            mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
            # Clip the box's reach to the window: beyond it the mask is False by contract.
            vr0, vc0, vr1, vc1 = max(r0, 0), max(c0, 0), min(r1, size_y), min(c1, size_x)
            mask[vr0 - r0 : vr1 - r0, vc0 - c0 : vc1 - c0] = local[vr0:vr1, vc0:vc1] == index + 1
            boxes.append([c0, r0, c1, r1])
            scores.append(float(rng.uniform(0.5, 1.0)))
            masks.append(mask)
        return {"boxes": np.array(boxes, dtype=np.float64).reshape(-1, 4), "scores": np.array(scores), "masks": masks}


def _read_labels(source: str, level: int):
    """The label image at ``source``, read lazily: a memory-mapped ``.npy``, or an OME-Zarr image's
    ``labels/ground_truth`` at ``level``."""
    if source.endswith(".npy"):
        return np.load(source, mmap_mode="r")
    from cellsam_ray.io.ngff import open_image

    return open_image(source).label("ground_truth").array(level)
