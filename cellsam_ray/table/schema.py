"""What the cell table's columns are: named once here, for the Parquet writer and ``schemas/cells.schema.json``.

The fixed columns are the same for every slide; the intensity columns repeat per image channel
(``mean_<channel>``, ``total_<channel>``), named after the channel's ``omero`` label. A slide's layout
(``TableLayout``) fixes those names and the level's physical geometry, so every task that makes rows and
the one that writes them agree on the columns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
METADATA_KEY = b"cellsam_ray"  # Parquet key-value metadata: the layout as JSON


@dataclass(frozen=True)
class Column:
    """One column: its name (``{channel}`` for per-channel ones), numpy/Arrow type name, unit and meaning."""

    name: str
    type: str
    unit: str
    description: str


FIXED_COLUMNS = (
    Column("id", "uint32", "", "The cell's label id in labels/<name> (1..N; a cell with no painted pixel has no row)."),
    Column("area", "int64", "pixel", "Pixels of the cell at the segmented level."),
    Column("area_physical", "float64", "unit^2", "Area in the level's physical unit squared (see metadata 'unit')."),
    Column("centroid_y", "float64", "pixel", "Mean row of the cell's pixels, in pixels of the segmented level."),
    Column("centroid_x", "float64", "pixel", "Mean column of the cell's pixels, in pixels of the segmented level."),
    Column("centroid_y_physical", "float64", "unit", "centroid_y in physical units: translation + scale * pixel."),
    Column("centroid_x_physical", "float64", "unit", "centroid_x in physical units: translation + scale * pixel."),
    Column("bbox_y0", "int64", "pixel", "First row of the cell's bounding box."),
    Column("bbox_x0", "int64", "pixel", "First column of the cell's bounding box."),
    Column("bbox_y1", "int64", "pixel", "Row after the bounding box (half-open, as numpy slices)."),
    Column("bbox_x1", "int64", "pixel", "Column after the bounding box (half-open)."),
    Column("major_axis_length", "float64", "pixel",
           "Length of the ellipse with the same second moments (as skimage.measure.regionprops)."),
    Column("minor_axis_length", "float64", "pixel", "Width of that ellipse."),
    Column("eccentricity", "float64", "", "Eccentricity of that ellipse: 0 for a circle, towards 1 when elongated."),
    Column("orientation", "float64", "radian", "Angle between the row axis and the major axis (regionprops' convention)."),
    Column("extent", "float64", "", "area / bounding-box area."),
    Column("score", "float64", "", "Detector score of the kept detection."),
    Column("predicted_iou", "float64", "", "The segmenter's predicted mask IoU (0 when it gives none)."),
    Column("producer_row", "int32", "", "Tile-grid row of the tile whose window produced the kept detection."),
    Column("producer_col", "int32", "", "Tile-grid column of that tile."),
    Column("home_row", "int32", "", "Tile-grid row of the tile whose core holds the box centre (it numbered the cell)."),
    Column("home_col", "int32", "", "Tile-grid column of that tile."),
    Column("crosses_seam", "bool", "", "The cell's pixels lie in more than one tile core."),
    Column("cut_at_window", "bool", "", "The kept mask was cut by its producer's window edge (not the image edge)."),
    Column("oversized", "bool", "", "The box is larger than 2 x halo: the seam guarantee does not hold for it."),
)
CHANNEL_COLUMNS = (
    Column("mean_{channel}", "float64", "intensity", "Mean raw intensity of the channel over the cell's pixels."),
    Column("total_{channel}", "float64", "intensity", "Sum of the channel's raw intensities over the cell's pixels."),
)


@dataclass(frozen=True)
class TableLayout:
    """One slide's table: its channel column names and the segmented level's physical geometry."""

    channels: tuple[str, ...]  # column suffix per image channel, in channel-axis order
    channel_names: tuple[str, ...]  # the omero labels they come from ("" where the image names none)
    level: int
    scale: tuple[float, float]  # (y, x) physical size of a pixel
    translation: tuple[float, float]  # (y, x) physical position of pixel (0, 0)'s centre
    unit: str

    @property
    def column_names(self) -> list[str]:
        per_channel = [c.name.format(channel=ch) for c in CHANNEL_COLUMNS for ch in self.channels]
        return [c.name for c in FIXED_COLUMNS] + per_channel

    def arrow_schema(self) -> pa.Schema:
        types = {c.name: c.type for c in FIXED_COLUMNS}
        types.update({c.name.format(channel=ch): c.type for c in CHANNEL_COLUMNS for ch in self.channels})
        fields = [pa.field(name, pa.from_numpy_dtype(np.dtype(types[name])), nullable=False)
                  for name in self.column_names]
        return pa.schema(fields, metadata={METADATA_KEY: json.dumps(self.metadata()).encode()})

    def metadata(self) -> dict:
        return dict(format_version=FORMAT_VERSION, level=self.level, scale=list(self.scale),
                    translation=list(self.translation), unit=self.unit,
                    channels=[dict(column=c, name=n) for c, n in zip(self.channels, self.channel_names)])


def channel_columns(names: tuple[str, ...], n_channels: int) -> tuple[str, ...]:
    """Column suffixes for the channels: each omero label made identifier-safe, or ``c<index>`` for all
    of them where a label is missing or two would give the same column."""
    padded = list(names[:n_channels]) + [""] * (n_channels - len(names))
    safe = [re.sub(r"[^0-9A-Za-z_]+", "_", n).strip("_") for n in padded]
    if all(safe) and len(set(safe)) == n_channels:
        return tuple(safe)
    return tuple(f"c{i}" for i in range(n_channels))


def describe() -> dict:
    """The table's schema as plain JSON: what ``schemas/cells.schema.json`` holds."""
    return dict(
        title="labels/<name>/cells.parquet",
        description=("One row per cell of labels/<name>, in id order, measured at the segmented level. "
                     "Per-channel columns repeat for every image channel, {channel} being the channel's "
                     "omero label made identifier-safe (c<index> for every channel when a label is missing or two collide). The Parquet "
                     "key-value metadata 'cellsam_ray' holds the level, its scale, translation and unit, "
                     "and the channel names."),
        format_version=FORMAT_VERSION,
        columns=[vars(c) for c in FIXED_COLUMNS],
        channel_columns=[vars(c) for c in CHANNEL_COLUMNS],
    )
