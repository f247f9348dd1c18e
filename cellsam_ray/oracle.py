"""The ground-truth segmenter under the name specs and scripts have named it by since the first release:
``--segmenter cellsam_ray.oracle:GroundTruthSegmenter``. It lives in ``testing.oracle`` (what the demo and
the tests name); this name keeps working, and takes the cells as it first did when no option names them.

Its cells: ``--segmenter-option labels=URL`` (an OME-Zarr image whose ``labels/ground_truth`` it reads, or a
``.npy`` label image), else the ``CELLSAM_RAY_ORACLE_LABELS`` variable of every process that builds it (and
``CELLSAM_RAY_ORACLE_LEVEL``, default 0). A variable is not part of a run's resume fingerprint and reaches
a cluster's nodes only where they set it; the option is both, and is the way to prefer.
"""

from __future__ import annotations

import os

import numpy as np

from cellsam_ray.errors import UserError
from cellsam_ray.testing import oracle

LABELS_VARIABLE = "CELLSAM_RAY_ORACLE_LABELS"
LEVEL_VARIABLE = "CELLSAM_RAY_ORACLE_LEVEL"


def GroundTruthSegmenter(labels: np.ndarray | str | None = None, *, level: int | None = None,  # noqa: N802
                         jitter: int = 3) -> oracle.GroundTruthSegmenter:
    """``testing.oracle.GroundTruthSegmenter`` of ``labels``, or of the cells the environment names."""
    if labels is None:
        labels = os.environ.get(LABELS_VARIABLE)
        if not labels:
            raise UserError("cellsam_ray.oracle:GroundTruthSegmenter needs the cells it answers with: "
                            "--segmenter-option labels=URL (an OME-Zarr image with labels/ground_truth, or a .npy "
                            f"label image), or {LABELS_VARIABLE} set for every process of the run")
    if level is None:
        level = int(os.environ.get(LEVEL_VARIABLE, "0"))
    return oracle.GroundTruthSegmenter(labels, level=level, jitter=jitter)
