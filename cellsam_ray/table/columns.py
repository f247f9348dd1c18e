"""From a cell's combined sums to its table row: centroid, bounding box, shape, scores and mean intensities.

Shape follows ``skimage.measure.regionprops`` (the ellipse with the same second central moments), so
values can be checked against it; the central moments are formed from exact integer sums
(n·Σy² − (Σy)², ...), so a symmetric cell gets exactly symmetric moments and a well-defined orientation.
"""

from __future__ import annotations

import numpy as np

from cellsam_ray.table.measure import CellSums
from cellsam_ray.table.schema import CHANNEL_COLUMNS, FIXED_COLUMNS, TableLayout


def shape_measures(n: np.ndarray, sy: np.ndarray, sx: np.ndarray, syy: np.ndarray, sxx: np.ndarray,
                   sxy: np.ndarray) -> dict[str, np.ndarray]:
    """Major/minor axis length, eccentricity and orientation from a region's pixel count and moments.

    Moments are sums of (y, x), y², x², y·x over the pixels, from any fixed origin; all are integers.
    """
    n_i = n.astype(np.int64)
    # n² times the central moments, exactly (the sums are integers well inside int64).
    m_yy = n_i * syy.astype(np.int64) - sy.astype(np.int64) ** 2
    m_xx = n_i * sxx.astype(np.int64) - sx.astype(np.int64) ** 2
    m_xy = n_i * sxy.astype(np.int64) - sy.astype(np.int64) * sx.astype(np.int64)
    n2 = n.astype(np.float64) ** 2
    # regionprops' inertia tensor [[a, b], [b, c]]: a = var(x), b = -cov(y, x), c = var(y).
    a, b, c = m_xx / n2, -m_xy / n2, m_yy / n2
    half_gap = np.sqrt(((a - c) / 2) ** 2 + b**2)
    major = (a + c) / 2 + half_gap
    minor = np.maximum((a + c) / 2 - half_gap, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        eccentricity = np.where(major > 0, np.sqrt(np.minimum(2 * half_gap / major, 1.0)), 0.0)
    orientation = np.where(
        m_xx == m_yy, np.where(b < 0, np.pi / 4, -np.pi / 4), 0.5 * np.arctan2(-2 * b, c - a)
    )
    return dict(major_axis_length=4 * np.sqrt(major), minor_axis_length=4 * np.sqrt(minor),
                eccentricity=eccentricity, orientation=orientation)


def cell_columns(cells: CellSums, layout: TableLayout) -> dict[str, np.ndarray]:
    """The table's columns for combined cells (one row each), typed and ordered as ``layout`` says."""
    n = cells.col("pixels")
    y0, x0 = cells.meta_col("y0"), cells.meta_col("x0")
    centroid_y = y0 + cells.col("sy") / n
    centroid_x = x0 + cells.col("sx") / n
    bbox = {name: cells.col(name[-2:]) for name in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")}
    (scale_y, scale_x), (shift_y, shift_x) = layout.scale, layout.translation
    values = dict(
        id=cells.meta_col("id"),
        area=n,
        area_physical=n * scale_y * scale_x,
        centroid_y=centroid_y,
        centroid_x=centroid_x,
        centroid_y_physical=shift_y + scale_y * centroid_y,
        centroid_x_physical=shift_x + scale_x * centroid_x,
        **bbox,
        **shape_measures(n, *(cells.col(k) for k in ("sy", "sx", "syy", "sxx", "sxy"))),
        extent=n / ((bbox["bbox_y1"] - bbox["bbox_y0"]) * (bbox["bbox_x1"] - bbox["bbox_x0"])),
        score=cells.meta_col("score"),
        predicted_iou=cells.meta_col("iou"),
        producer_row=cells.meta_col("producer_row"),
        producer_col=cells.meta_col("producer_col"),
        home_row=cells.meta_col("home_row"),
        home_col=cells.meta_col("home_col"),
        crosses_seam=cells.col("pieces") > 1,
        cut_at_window=cells.meta_col("touches_window_edge") > 0,
        oversized=cells.meta_col("oversized") > 0,
    )
    columns = {c.name: np.asarray(values[c.name]).astype(c.type) for c in FIXED_COLUMNS}
    per_channel = {"mean_{channel}": cells.intensity / n[:, None], "total_{channel}": cells.intensity}
    for spec in CHANNEL_COLUMNS:
        for i, channel in enumerate(layout.channels):
            columns[spec.name.format(channel=channel)] = per_channel[spec.name][:, i].astype(spec.type)
    return columns
