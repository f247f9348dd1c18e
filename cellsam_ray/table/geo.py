"""Cell outlines as files: ``cells.geojson`` for QuPath, ``cells.geoparquet`` for GeoPandas, Sopa and
SpatialData's shapes. Both hold one feature / row per cell of the table, in id order, in level-0 pixel
coordinates (x right, y down; pixel (r, c) covers [c, c+1) × [r, r+1)), which is what QuPath takes for
an image's objects. The physical transform of those coordinates is in each file's metadata.

The encodings are made in the row tasks (``encode``), so the one writer only appends bytes:
- GeoJSON follows QuPath's reader: ``properties.objectType`` "cell", ``properties.measurements`` an object
  of numbers (booleans as 0/1, floats to 7 significant digits: the Parquet table keeps them whole; a value
  that is not finite is left out, as JSON has no NaN), the label id as the feature's ``id`` and
  ``properties.label_id``. QuPath reads a feature's ``id`` as a UUID and ignores one that is not.
- GeoParquet 1.1: the label id and ``geometry`` (WKB), with the ``geo`` key-value metadata; the
  coordinates are pixels, not a map's, so the column's ``crs`` is null (the spec's "undefined"). The
  measurements are the table's, joined on ``id`` (``cells.parquet``): not written twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from cellsam_ray.io.storage import open_for_writing
from cellsam_ray.table.outlines import SIMPLIFY_PX
from cellsam_ray.table.schema import METADATA_KEY, TableLayout

GEOPARQUET_VERSION = "1.1.0"
GEOMETRY = "geometry"


@dataclass(frozen=True)
class OutlineLayout:
    """Where outline coordinates go: from the segmented level's pixels to level 0's (``downsample``, y and x),
    and level 0's physical transform (the NGFF scale and translation of a pixel's centre)."""

    downsample: tuple[float, float]
    scale: tuple[float, float]
    translation: tuple[float, float]
    unit: str

    def metadata(self) -> dict:
        return dict(
            coordinates="level-0 pixels: x right, y down; pixel (row r, column c) covers [c, c+1) x [r, r+1)",
            to_physical=("physical = translation + scale * (coordinate - 0.5), per axis (y, x), in unit "
                         "(NGFF places a pixel's centre at its index)"),
            scale=list(self.scale), translation=list(self.translation), unit=self.unit,
            simplified_px=SIMPLIFY_PX, segmented_level_downsample=list(self.downsample))


@dataclass
class GeoBlock:
    """Some cells' outlines, encoded: WKB for GeoParquet, GeoJSON features joined by commas."""

    wkb: pa.Array
    features: str

    @staticmethod
    def concat(blocks: list["GeoBlock"]) -> "GeoBlock":
        return GeoBlock(pa.concat_arrays([b.wkb for b in blocks]), ",\n".join(b.features for b in blocks if b.features))


def encode(rows: pa.Table, shapes: np.ndarray, outlines: OutlineLayout) -> GeoBlock:
    """The outlines of ``rows``' cells (``shapes``, simplified, in segmented-level pixels, in the rows'
    order) moved to level 0 and encoded."""
    fy, fx = outlines.downsample
    if (fy, fx) != (1.0, 1.0):
        shapes = shapely.transform(shapes, lambda xy: xy * np.array([fx, fy]))
    geometry = shapely.to_geojson(shapes).tolist()
    names = [json.dumps(name) + ":" for name in rows.column_names]
    values = [_json_numbers(rows.column(name).to_numpy(zero_copy_only=False)) for name in rows.column_names]
    features = []
    for cell, text, row in zip(rows.column("id").to_pylist(), geometry, zip(*values)):
        measurements = ",".join(name + value for name, value in zip(names, row) if value is not None)
        features.append(f'{{"type":"Feature","id":{cell},"geometry":{text},"properties":{{"objectType":"cell",'
                        f'"label_id":{cell},"measurements":{{{measurements}}}}}}}')
    return GeoBlock(pa.array(shapely.to_wkb(shapes), pa.binary()), ",\n".join(features))


def _json_numbers(column: np.ndarray) -> list[str | None]:
    """A column's values as JSON numbers: booleans as 0/1, floats to 7 significant digits, None where a
    float is not finite (JSON has no NaN)."""
    if column.dtype.kind in "biu":
        return column.astype(np.int64).astype(str).tolist()
    text = np.char.mod("%.7g", column).tolist()
    if np.isfinite(column).all():
        return text
    return [t if ok else None for t, ok in zip(text, np.isfinite(column).tolist())]


def geoparquet_schema(layout: TableLayout, outlines: OutlineLayout) -> pa.Schema:
    """The label id and a WKB ``geometry`` column, with the ``geo`` metadata GeoParquet readers need and
    ours (the table's layout, the outlines' coordinates)."""
    table = layout.arrow_schema()
    geo = dict(version=GEOPARQUET_VERSION, primary_column=GEOMETRY,
               columns={GEOMETRY: dict(encoding="WKB", geometry_types=["Polygon", "MultiPolygon"], crs=None)})
    ours = {**json.loads(table.metadata[METADATA_KEY]), "outlines": outlines.metadata()}
    return pa.schema([table.field("id"), pa.field(GEOMETRY, pa.binary(), nullable=False)],
                     metadata={b"geo": json.dumps(geo).encode(), METADATA_KEY: json.dumps(ours).encode()})


class GeoStreams:
    """The two outline files, streamed as row blocks come (in id order), finished by ``close``."""

    def __init__(self, geojson_url: str, geoparquet_url: str, storage_options: dict, layout: TableLayout,
                 outlines: OutlineLayout) -> None:
        self.urls = dict(geojson=geojson_url, geoparquet=geoparquet_url)
        self.geojson = open_for_writing(geojson_url, storage_options)
        head = dict(type="FeatureCollection", cellsam_ray=outlines.metadata())
        self.geojson.write(json.dumps(head)[:-1].encode() + b',"features":[\n')
        self.schema = geoparquet_schema(layout, outlines)
        self.parquet_file = open_for_writing(geoparquet_url, storage_options)
        self.parquet = pq.ParquetWriter(self.parquet_file, self.schema)
        self.features = 0

    def write(self, rows: pa.Table, block: GeoBlock) -> None:
        """Write one row group's cells (``rows`` and their outlines)."""
        if not rows.num_rows:
            return
        self.geojson.write((",\n" if self.features else "").encode() + block.features.encode())
        self.features += rows.num_rows
        table = pa.Table.from_arrays([rows.column("id"), block.wkb], schema=self.schema)
        self.parquet.write_table(table, row_group_size=max(table.num_rows, 1))

    def close(self) -> dict:
        self.geojson.write(b"\n]}\n")
        self.geojson.close()
        self.parquet.close()
        self.parquet_file.close()
        return dict(self.urls, features=self.features)

