"""The per-cell table: sums per core combine into exact per-cell values, and a segmented slide's table
equals a direct NumPy computation on its written labels and image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from skimage.measure import regionprops

from cellsam_ray.driver.api import segment
from cellsam_ray.io.ngff import open_image
from cellsam_ray.merge.objects import META_COLUMNS, CellSet
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.table.columns import cell_columns
from cellsam_ray.table.measure import CellSums, combine, measure_core
from cellsam_ray.table.schema import TableLayout, channel_columns

ROOT = Path(__file__).resolve().parents[1]
ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"
TILE = 128
TILING = dict(tile=TILE, halo=40, band=8, chunk=64)


def reference(labels: np.ndarray, image: np.ndarray) -> dict[int, dict]:
    """Each cell's area, centroid, bbox and per-channel total and mean, by plain NumPy."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    ys, xs = np.divmod(order, labels.shape[1])
    out = {}
    for cell, start, n in zip(ids, starts, counts):
        if cell == 0:
            continue
        y, x = ys[start : start + n], xs[start : start + n]
        values = image[:, y, x].astype(np.float64)
        out[int(cell)] = dict(area=int(n), cy=y.mean(), cx=x.mean(), bbox=(y.min(), x.min(), y.max() + 1, x.max() + 1),
                              total=values.sum(axis=1), mean=values.mean(axis=1),
                              cores=len({(a // TILE, b // TILE) for a, b in zip(y.tolist(), x.tolist())}))
    return out


def check_against_numpy(columns: dict, labels: np.ndarray, image: np.ndarray, channels: tuple[str, ...]) -> None:
    expected = reference(labels, image)
    assert columns["id"].tolist() == sorted(expected)  # one row per labelled cell, in id order
    for row, cell in enumerate(columns["id"].tolist()):
        e = expected[cell]
        assert columns["area"][row] == e["area"]
        assert abs(columns["centroid_y"][row] - e["cy"]) < 1e-9 and abs(columns["centroid_x"][row] - e["cx"]) < 1e-9
        assert tuple(columns[f"bbox_{k}"][row] for k in ("y0", "x0", "y1", "x1")) == e["bbox"]
        assert bool(columns["crosses_seam"][row]) == (e["cores"] > 1)
        for c, name in enumerate(channels):
            assert columns[f"total_{name}"][row] == e["total"][c]  # integer sums: exact
            assert abs(columns[f"mean_{name}"][row] - e["mean"][c]) <= 1e-9 * e["mean"][c]
    # Shape measures follow skimage's regionprops.
    props = {p.label: p for p in regionprops(labels)}
    for row, cell in enumerate(columns["id"].tolist()):
        p = props[cell]
        for ours, theirs in (("eccentricity", p.eccentricity), ("major_axis_length", p.axis_major_length),
                             ("minor_axis_length", p.axis_minor_length), ("orientation", p.orientation),
                             ("extent", p.extent)):
            assert abs(columns[ours][row] - theirs) < 1e-6, (cell, ours)


# ------------------------------------------------------------------------------------ sums, without Ray
@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("table") / "small.ome.zarr")
    write_synthetic_slide(url, size=(320, 288), channels=3, ngff="0.5", seed=2, chunk=64)
    image = open_image(url)
    return np.asarray(image.label("ground_truth").array(0)[:]), np.asarray(image.array(0)[:])


def records_for(labels: np.ndarray) -> CellSet:
    """Kept-cell records for known labels: mask = the cell's bounding-box crop, home = the core of its
    bounding-box centre, as the merge would give."""
    ids = np.unique(labels[labels > 0])
    meta = np.zeros((ids.size, len(META_COLUMNS)))
    col = {n: i for i, n in enumerate(META_COLUMNS)}
    masks = []
    for row, cell in enumerate(ids):
        ys, xs = np.nonzero(labels == cell)
        y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        masks.append(labels[y0:y1, x0:x1] == cell)
        meta[row, [col["y0"], col["x0"], col["id"], col["score"]]] = y0, x0, cell, 0.9
        meta[row, [col["home_row"], col["home_col"]]] = ((y0 + y1) / 2) // TILE, ((x0 + x1) / 2) // TILE
        meta[row, [col["producer_row"], col["producer_col"]]] = meta[row, [col["home_row"], col["home_col"]]]
    return CellSet(meta=meta, masks=masks)


def test_core_sums_combine_to_whole_cells(small_slide):
    labels, image = small_slide
    cells = records_for(labels)
    h, w = labels.shape
    complete, pieces = [], []
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            done, partial = measure_core(labels[y : y + TILE, x : x + TILE], (y, x),
                                         image[:, y : y + TILE, x : x + TILE], cells)
            # A complete cell's mask lies inside the core; nothing else is complete.
            assert all(y <= a and x <= b for a, b in zip(done.meta_col("y0"), done.meta_col("x0")))
            complete.append(done)
            pieces.append(partial)
    done_ids = CellSums.concat(complete).meta_col("id")
    assert not np.isin(done_ids, CellSums.concat(pieces).meta_col("id")).any()  # complete means complete
    whole = combine(CellSums.concat(complete + pieces))
    expected = reference(labels, image)
    assert whole.meta_col("id").tolist() == sorted(expected)
    # One piece per core that holds pixels of the cell.
    assert whole.col("pieces").tolist() == [expected[i]["cores"] for i in sorted(expected)]
    assert (whole.col("pieces") > 1).sum() > 10
    names = channel_columns(("DAPI", "E-cadherin", "Ki67"), 3)
    layout = TableLayout(channels=names, channel_names=names, level=0, scale=(0.5, 0.5),
                         translation=(0.0, 0.0), unit="micrometer")
    check_against_numpy(cell_columns(whole, layout), labels, image, names)


def test_painted_ids_must_be_among_the_records(small_slide):
    labels, image = small_slide
    core = labels[:TILE, :TILE]
    with pytest.raises(ValueError, match="none of the given cells"):
        measure_core(core, (0, 0), image[:, :TILE, :TILE], CellSet())


def test_channel_columns_are_safe_and_unique():
    assert channel_columns(("DAPI", "E-cadherin", "CD3 (T)"), 3) == ("DAPI", "E_cadherin", "CD3_T")
    assert channel_columns(("DAPI", "DAPI"), 2) == ("c0", "c1")
    assert channel_columns(("DAPI",), 2) == ("c0", "c1")  # the image names only one of two channels


# ----------------------------------------------------------------------------- a segmented slide, on Ray
@pytest.fixture(scope="module")
def segmented(tmp_path_factory, ray_cluster):
    url = str(tmp_path_factory.mktemp("table") / "slide.ome.zarr")
    info = write_synthetic_slide(url, size=(384, 320), channels=4, ngff="0.5", seed=9, chunk=64)
    report = segment(dict(input=url, nuclear=["DAPI"], whole_cell=[info.channel_names[1]], segmenter=ORACLE,
                          segmenter_options=dict(labels=url), cell_table_h5ad=True, **TILING), progress=False)
    image = open_image(url)
    return url, report, np.asarray(image.label("cells").array(0)[:]), np.asarray(image.array(0)[:])


def test_table_equals_numpy_on_the_written_labels(segmented):
    url, report, labels, image = segmented
    table = pq.read_table(f"{url}/labels/cells/cells.parquet")
    meta = json.loads(table.schema.metadata[b"cellsam_ray"])
    channels = tuple(c["column"] for c in meta["channels"])
    assert len(channels) == image.shape[0] == 4  # every image channel, not only the two segmented
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    check_against_numpy(columns, labels, image, channels)
    assert columns["crosses_seam"].any()  # the slide's seams were crossed, and the pieces combined
    # Physical units: the synthetic slide has 0.5 µm pixels and no translation.
    assert meta["unit"] == "micrometer" and meta["scale"] == [0.5, 0.5]
    assert np.allclose(columns["centroid_x_physical"], 0.5 * columns["centroid_x"], rtol=0, atol=1e-12)
    assert np.array_equal(columns["area_physical"], 0.25 * columns["area"])
    # Detector fields come from the kept detections: the oracle's scores, no IoU, a producer next to home.
    assert ((columns["score"] >= 0.5) & (columns["score"] <= 1)).all() and not columns["predicted_iou"].any()
    assert (np.abs(columns["producer_row"] - columns["home_row"]) <= 1).all()
    assert (columns["producer_row"] != columns["home_row"]).any() or (columns["producer_col"] != columns["home_col"]).any()
    assert report["cell_table"]["rows"] == len(columns["id"]) == report["summary"]["cells"]
    assert report["summary"]["cell_table"] == f"{url}/labels/cells/cells.parquet"


def test_parquet_schema_matches_the_committed_schema(segmented):
    url, *_ = segmented
    described = json.loads((ROOT / "schemas" / "cells.schema.json").read_text())
    schema = pq.read_schema(f"{url}/labels/cells/cells.parquet")
    channels = [c["column"] for c in json.loads(schema.metadata[b"cellsam_ray"])["channels"]]
    expected = [(c["name"], c["type"]) for c in described["columns"]]
    expected += [(c["name"].format(channel=ch), c["type"]) for c in described["channel_columns"] for ch in channels]
    assert [(f.name, str(f.type).replace("double", "float64")) for f in schema] == expected
    assert not any(f.nullable for f in schema)


def test_anndata_copy_holds_the_same_cells(segmented):
    anndata = pytest.importorskip("anndata")
    url, report, *_ = segmented
    table = pq.read_table(f"{url}/labels/cells/cells.parquet")
    adata = anndata.read_h5ad(report["cell_table"]["h5ad"])
    channels = list(adata.var["column"])
    assert adata.n_obs == table.num_rows and adata.n_vars == 4
    assert list(adata.obs_names) == [str(i) for i in table.column("id").to_pylist()]
    assert np.array_equal(adata.X, np.stack([table.column(f"mean_{c}").to_numpy() for c in channels], axis=1))
    assert np.array_equal(adata.layers["total"][:, 0], table.column(f"total_{channels[0]}").to_numpy())
    assert channels == [c["column"] for c in json.loads(table.schema.metadata[b"cellsam_ray"])["channels"]]


def test_anndata_copy_is_a_spatialdata_table_of_the_labels(segmented):
    """What SpatialData's TableModel requires to link a table to a label image, and what squidpy reads."""
    anndata = pytest.importorskip("anndata")
    import pandas as pd

    url, report, labels, _ = segmented
    adata = anndata.read_h5ad(report["cell_table"]["h5ad"])
    assert adata.uns["spatialdata_attrs"] == dict(region="cells", region_key="region", instance_key="id")
    region = adata.obs["region"]
    assert isinstance(region.dtype, pd.CategoricalDtype) and list(region.cat.categories) == ["cells"]
    assert (region == "cells").all()
    ids = adata.obs["id"]
    assert np.issubdtype(ids.dtype, np.integer)
    painted = np.unique(labels)
    assert ids.tolist() == painted[painted > 0].tolist()  # every painted label, once, and nothing else
    # Physical centroids (0.5 µm pixels), x then y, in the unit uns names; the pixel ones would differ.
    assert adata.uns["cellsam_ray"]["unit"] == "micrometer"
    physical = adata.obs[["centroid_x_physical", "centroid_y_physical"]].to_numpy()
    assert np.array_equal(adata.obsm["spatial"], physical)
    assert np.allclose(adata.obsm["spatial"], 0.5 * adata.obs[["centroid_x", "centroid_y"]].to_numpy())
    # Channels by the names the file gives ("E-cadherin", not its column suffix "E_cadherin").
    image = open_image(url)
    assert list(adata.var_names) == list(image.channel_names) and "E-cadherin" in adata.var_names
    assert "E_cadherin" in list(adata.var["column"])


def h5ad_of(tmp_path, names: tuple[str, ...], ids: list[int]):
    """Write a table with ``names`` for channel names and rows ``ids`` through the writer; read it back."""
    import anndata

    from cellsam_ray.io.storage import StorageAccess
    from cellsam_ray.table.write import ParquetStream

    layout = TableLayout(channels=channel_columns(names, len(names)), channel_names=names, level=0,
                         scale=(2.0, 2.0), translation=(10.0, 20.0), unit="micrometer")
    schema = layout.arrow_schema()
    rows = {f.name: np.zeros(len(ids), f.type.to_pandas_dtype()) for f in schema}
    rows["id"] = np.array(ids, np.uint32)
    stream = ParquetStream(str(tmp_path / "cells.parquet"), StorageAccess(), layout, str(tmp_path / "cells.h5ad"),
                           region="nuclei")
    stream.append((pa.Table.from_pydict(rows, schema=schema), None))
    stream.close()
    return anndata.read_h5ad(tmp_path / "cells.h5ad")


def test_anndata_channel_names_fall_back_to_the_column_suffixes(tmp_path):
    """var is indexed by the image's channel names; where one is missing or two are equal, by the suffixes."""
    pytest.importorskip("anndata")
    assert list(h5ad_of(tmp_path, ("DAPI", "CD3 (T)"), [1, 2]).var_names) == ["DAPI", "CD3 (T)"]
    assert list(h5ad_of(tmp_path, ("DAPI", "DAPI"), [1]).var_names) == ["c0", "c1"]
    adata = h5ad_of(tmp_path, ("DAPI", ""), [4])
    assert list(adata.var_names) == ["c0", "c1"] and list(adata.uns["cellsam_ray"]["channel_names"]) == ["DAPI", ""]
    assert adata.uns["spatialdata_attrs"]["region"] == "nuclei" and adata.obs["id"].tolist() == [4]


def test_anndata_copy_of_no_cells_annotates_nothing(tmp_path):
    """SpatialData refuses a table whose region has no rows: a table of no cells names no region."""
    pytest.importorskip("anndata")
    adata = h5ad_of(tmp_path, ("DAPI",), [])
    assert adata.n_obs == 0 and "spatialdata_attrs" not in adata.uns
    assert list(adata.obs["region"].cat.categories) == ["nuclei"]


def test_flags_turn_the_table_and_pictures_off(tmp_path, ray_cluster):
    url = str(tmp_path / "off.ome.zarr")
    write_synthetic_slide(url, size=(256, 256), channels=2, ngff="0.5", seed=4, chunk=64)
    report = segment(dict(input=url, nuclear=["DAPI"], segmenter=ORACLE, segmenter_options=dict(labels=url),
                          cell_table=False, qc_images=False, **TILING), progress=False)
    assert report["cell_table"] is None and report["qc"] is None and report["summary"]["cell_table"] is None
    written = sorted(p.name for p in (tmp_path / "off.ome.zarr" / "labels" / "cells").iterdir())
    assert "cells.parquet" not in written and "qc" not in written and "report.json" in written
    assert "cells.geojson" not in written and "cells.geoparquet" not in written  # outlines follow the table


def test_intensity_sums_stay_exact_at_the_dtype_limits():
    """Row prefix sums are int32 where a row of the dtype's largest values fits, int64 where not: the
    sums of saturated uint16 and int16 cores (and of a row too wide for int32) equal exact NumPy sums."""
    from cellsam_ray.table.measure import _prefix_dtype

    assert _prefix_dtype(np.dtype(np.uint16), 768) == np.int32
    assert _prefix_dtype(np.dtype(np.uint16), 40000) == np.int64
    assert _prefix_dtype(np.dtype(np.uint32), 768) == np.int64
    assert _prefix_dtype(np.dtype(np.float32), 768) == np.float64
    for dtype, value, width in ((np.uint16, 65535, 768), (np.int16, -32768, 768), (np.uint16, 65535, 40000)):
        labels = np.ones((2, width), np.uint32)
        labels[1] = 2
        pixels = np.full((1, 2, width), value, dtype)
        cells = records_for(labels)
        done, _ = measure_core(labels, (0, 0), pixels, cells)
        assert done.intensity[:, 0].tolist() == [value * width, value * width]
