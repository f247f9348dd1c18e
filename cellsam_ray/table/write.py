"""Writing the cell table: one Parquet file streamed tile by tile, the outlines beside it (``geo``) and an
optional AnnData copy.

Rows arrive per home tile in raster order, which is id order, and are written in row groups of at least
``ROW_GROUP_ROWS`` cells, so the writer holds one row group whatever the slide's size. Each file is one
object (readers and AnnData want one table), so they have one writer.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cellsam_ray.errors import UserError
from cellsam_ray.io.storage import StorageAccess, open_for_writing
from cellsam_ray.table.geo import GeoBlock, GeoStreams, OutlineLayout
from cellsam_ray.table.schema import CHANNEL_COLUMNS, METADATA_KEY, TableLayout

ROW_GROUP_ROWS = 65_536


class ParquetStream:
    """Appends blocks of rows to one Parquet file at ``url``, and their outlines to the two files that
    ``outlines`` names (GeoJSON, GeoParquet URLs and the layout) when given; ``close`` finishes them (and
    the AnnData copy)."""

    def __init__(self, url: str, storage: StorageAccess, layout: TableLayout, h5ad_url: str | None = None,
                 region: str = "", outlines: tuple[str, str, OutlineLayout] | None = None) -> None:
        # Resolved here, in the writer's process: actor arguments are kept by Ray and must hold no secret.
        self.url, self.storage_options, self.layout = url, storage.options() or {}, layout
        self.h5ad_url, self.region = h5ad_url, region  # region: the label image the AnnData copy annotates
        self.file = open_for_writing(url, self.storage_options)
        self.writer = pq.ParquetWriter(self.file, layout.arrow_schema())
        self.geo = GeoStreams(*outlines[:2], self.storage_options, layout, outlines[2]) if outlines else None
        self.pending: list[tuple[pa.Table, GeoBlock | None]] = []
        self.rows = 0

    def append(self, block: tuple[pa.Table, GeoBlock | None]) -> None:
        """Take one row task's rows and, with outlines on, their outlines."""
        self.pending.append(block)
        if sum(rows.num_rows for rows, _ in self.pending) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            table = pa.concat_tables([rows for rows, _ in self.pending])
            self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
            if self.geo:
                self.geo.write(table, GeoBlock.concat([geo for _, geo in self.pending]))
            self.rows += table.num_rows
            self.pending = []

    def close(self) -> dict:
        """Finish the files; what the report says about them."""
        self._flush()
        self.writer.close()
        self.file.close()
        out = dict(url=self.url, rows=self.rows, columns=len(self.layout.column_names))
        if self.geo:
            out["outlines"] = self.geo.close()
        if self.h5ad_url:
            write_h5ad(self.url, self.h5ad_url, self.region, self.storage_options)
            out["h5ad"] = self.h5ad_url
        return out


def require_anndata() -> None:
    """UserError before any model time when an AnnData copy is asked for but cannot be written."""
    try:
        import anndata  # noqa: F401
    except ImportError:
        raise UserError("--cell-table-h5ad needs anndata: pip install 'cellsam-ray[scverse]'") from None


def write_h5ad(parquet_url: str, h5ad_url: str, region: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write the table as AnnData that SpatialData's ``TableModel`` and squidpy take as it is.

    - ``X``: mean intensities (cells × channels); ``layers["total"]``: the totals.
    - ``var``: indexed by the channels' names as the image's omero metadata gives them; where a name is
      missing or two are equal (AnnData wants unique names) every channel goes by its column suffix
      (``c0``, ``c1``, ...) instead. ``var["column"]`` is that suffix, naming the Parquet columns.
    - ``obs``: every other column, indexed by id as text (AnnData's index is text). ``obs["region"]`` is
      categorical with ``region`` as its one category: the label image's name, which is the element name
      SpatialData gives ``labels/<name>``. ``obs["id"]`` (uint32) holds the label ids, the values the
      label image paints. ``uns["spatialdata_attrs"]`` names the region, ``region_key="region"`` and
      ``instance_key="id"``; a table of no cells has none, as SpatialData refuses a region with no rows.
    - ``obsm["spatial"]``: centroids (x, y) in physical units, the unit in ``uns["cellsam_ray"]["unit"]``
      (``centroid_x_physical``, ``centroid_y_physical``; the pixel ones stay in ``obs``). squidpy reads it
      as it is (``coord_type="generic"``); it needs no ``uns["spatial"]``, which only holds Visium images.
      The table counts pixel (0, 0)'s centre at ``translation``; SpatialData counts it half a pixel further
      (pixel centres at i + 0.5), so its ``get_centroids`` of the labels come out ``scale / 2`` larger.
    - ``uns["cellsam_ray"]``: the level's geometry and the channels' names as the image gives them.

    AnnData holds the whole table in memory: cells × channels × 16 bytes (mean and total).
    """
    import anndata
    import pandas as pd

    options = storage_options or {}
    with fsspec.open(parquet_url, "rb", **options) as f:
        table = pq.read_table(f)
    layout = json.loads(table.schema.metadata[METADATA_KEY])
    channels = [c["column"] for c in layout["channels"]]
    names = [c["name"] for c in layout["channels"]]
    mean_name, total_name = (c.name for c in CHANNEL_COLUMNS)
    per_channel = {spec.format(channel=ch) for spec in (mean_name, total_name) for ch in channels}
    obs = table.drop_columns(sorted(per_channel)).to_pandas()
    obs.index = pd.Index(obs["id"].astype(str).to_numpy())
    obs["region"] = pd.Categorical([region] * len(obs), categories=[region])

    def matrix(spec: str) -> np.ndarray:
        return np.stack([table.column(spec.format(channel=ch)).to_numpy() for ch in channels], axis=1)

    uns = {"cellsam_ray": dict(level=layout["level"], scale=layout["scale"], translation=layout["translation"],
                               unit=layout["unit"], channel_names=names)}
    if len(obs):
        uns["spatialdata_attrs"] = dict(region=region, region_key="region", instance_key="id")
    adata = anndata.AnnData(
        X=matrix(mean_name),
        obs=obs,
        var=pd.DataFrame({"column": channels}, index=names if all(names) and len(set(names)) == len(names)
                         else channels),
        layers={"total": matrix(total_name)},
        obsm={"spatial": obs[["centroid_x_physical", "centroid_y_physical"]].to_numpy()},
        uns=uns,
    )
    fs, path = fsspec.core.url_to_fs(h5ad_url, **options)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "cells.h5ad")
        adata.write_h5ad(local)
        fs.put_file(local, path)
