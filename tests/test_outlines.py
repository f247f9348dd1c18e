"""Cell outlines (issue 28): every cell of the label image once, as a polygon that rasterises back to it,
seam cells whole, in the files QuPath (GeoJSON) and GeoPandas / Sopa / SpatialData (GeoParquet) read.
A resumed run's and a cohort's outlines equal a clean run's: tests/test_faults.py and tests/test_cohort.py.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely

from cellsam_ray.cli import main
from cellsam_ray.driver.api import segment
from cellsam_ray.io.ngff import open_image
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import outline_ious, qupath_problems
from test_table import TILE, records_for  # kept-cell records for known labels, as the merge gives them
from cellsam_ray.table import outlines as outline_module
from cellsam_ray.table.outlines import home_outlines, outline_core
from cellsam_ray.table.trace import trace_labels

ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"
TILING = dict(tile=TILE, halo=40, band=8, chunk=64)


def mask_outline(mask: np.ndarray, origin: tuple[int, int]):
    """The outline of one mask whose top-left pixel is ``origin`` (row, column)."""
    return trace_labels(mask.astype(np.uint8), origin)[1][0]


def centres_inside(geometry, box: tuple[int, int, int, int], downsample=(1.0, 1.0)) -> np.ndarray:
    """Which pixels of ``box`` (y0, x0, y1, x1, in pixels of a level ``downsample`` times coarser than the
    geometry's) have their centre inside ``geometry``: the polygon rasterised."""
    y0, x0, y1, x1 = box
    ys, xs = np.mgrid[y0:y1, x0:x1]
    return shapely.contains_xy(geometry, (xs + 0.5) * downsample[1], (ys + 0.5) * downsample[0])


# ------------------------------------------------------------------------------------- without Ray
def test_a_mask_becomes_a_polygon_holding_exactly_its_pixel_centres():
    """The traced polygon is marching squares' (skimage's ``find_contours`` at 0.5, background connected)."""
    from skimage.measure import find_contours

    rng = np.random.default_rng(0)
    shapes_seen = set()
    for _ in range(200):  # noisy masks: holes, parts, pixels touching at a corner only
        h, w = rng.integers(1, 25, 2)
        mask = rng.random((h, w)) < 0.6
        if not mask.any():
            continue
        outline = mask_outline(mask, (40, 70))
        assert outline.is_valid
        shapes_seen.add(outline.geom_type)
        assert np.array_equal(centres_inside(outline, (40, 70, 40 + h, 70 + w)), mask)
        rings = [shapely.Polygon(c[:, ::-1] + (70 - 0.5, 40 - 0.5)) for c in find_contours(np.pad(mask, 1).astype(float), 0.5)]
        assert shapely.equals(outline, functools.reduce(shapely.symmetric_difference, rings))  # even-odd
    assert shapes_seen == {"Polygon", "MultiPolygon"}
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    assert len(mask_outline(ring, (0, 0)).interiors) == 1  # a hole stays a hole
    labels = np.array([[1, 1, 0], [2, 2, 2], [0, 1, 0]], np.uint32)  # cells side by side, one in two parts
    ids, shapes = trace_labels(labels)
    assert ids.tolist() == [1, 2] and shapes[0].geom_type == "MultiPolygon" and shapes[0].area + shapes[1].area < 9


def test_seam_cells_are_outlined_once_whole_from_their_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(outline_module, "SIMPLIFY_PX", 0.0)  # only collinear points go: the polygons themselves compared
    url = str(tmp_path / "slide.ome.zarr")
    write_synthetic_slide(url, size=(384, 320), channels=1, ngff="0.5", seed=3, chunk=64)
    labels = np.asarray(open_image(url).label("ground_truth").array(0)[:])
    cells = records_for(labels)
    rows, cols = math.ceil(384 / TILE), math.ceil(320 / TILE)
    cores = {(r, c): outline_core(labels[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE], (r * TILE, c * TILE), cells)
             for r in range(rows) for c in range(cols)}
    found: dict[int, shapely.Geometry] = {}
    for (r, c), own in cores.items():
        near = [cores[(r + dr, c + dc)] for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (r + dr, c + dc) in cores]
        ids, shapes = home_outlines((r, c), own, near)
        assert ids.tolist() == sorted(ids.tolist())
        for cell, shape in zip(ids.tolist(), shapes):
            assert cell not in found, f"cell {cell} outlined twice"
            found[cell] = shape
    assert sorted(found) == np.unique(labels[labels > 0]).tolist()  # every cell, once
    seams = [cell for cell in found if len({(y // TILE, x // TILE) for y, x in zip(*np.nonzero(labels == cell))}) > 1]
    assert len(seams) > 5
    for cell, shape in found.items():  # whole: the same polygon as the cell outlined in one piece
        ys, xs = np.nonzero(labels == cell)
        whole = mask_outline(labels[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == cell, (ys.min(), xs.min()))
        assert shapely.equals(shape, whole), cell


# ------------------------------------------------------------------------------------- a segmented slide
@pytest.fixture(scope="module")
def segmented(tmp_path_factory, ray_cluster):
    """A slide segmented by the oracle at level 0 (labels/cells) and at level 1 (labels/coarse)."""
    url = str(tmp_path_factory.mktemp("outlines") / "slide.ome.zarr")
    write_synthetic_slide(url, size=(512, 448), channels=3, ngff="0.5", seed=2, chunk=64)
    reports = {name: segment(dict(input=url, nuclear=["DAPI"], segmenter=ORACLE, segmenter_options=dict(labels=url),
                                  label_name=name, level=level, qc_images=False, **TILING), progress=False)
               for name, level in (("cells", 0), ("coarse", 1))}
    return url, reports


def read_outlines(url: str, name: str):
    import geopandas

    folder = Path(url, "labels", name)
    return geopandas.read_parquet(folder / "cells.geoparquet"), json.loads((folder / "cells.geojson").read_text())


def test_outlines_rasterise_back_to_the_labels_every_cell_once(segmented):
    url, reports = segmented
    outlines, _ = read_outlines(url, "cells")
    labels = np.asarray(open_image(url).label("cells").array(0)[:])
    table = pq.read_table(Path(url, "labels", "cells", "cells.parquet")).to_pandas()
    present = np.unique(labels[labels > 0]).tolist()
    assert outlines["id"].tolist() == table["id"].tolist() == present  # one row per cell, in id order
    assert outlines.is_valid.all() and outlines.crs is None
    overlap = outline_ious(outlines["id"].tolist(), outlines.geometry, labels)
    assert np.mean(list(overlap.values())) >= 0.9 and min(overlap.values()) >= 0.9
    seam = table["id"][table["crosses_seam"]].tolist()
    assert len(seam) > 5 and np.mean([overlap[c] for c in seam]) >= 0.9  # seam cells, whole
    # The measurements are the table's, joined on the label id.
    assert list(outlines.columns) == ["id", "geometry"]
    joined = outlines.merge(table, on="id")
    assert len(joined) == len(table) and (np.abs(joined.area - joined["area"]) < 0.25 * joined["area"] + 2).all()
    assert reports["cells"]["cell_table"]["outlines"]["features"] == len(present)


def test_outlines_of_a_coarser_level_are_in_level_0_pixels(segmented):
    url, _ = segmented
    outlines, collection = read_outlines(url, "coarse")
    labels = np.asarray(open_image(url).label("coarse").array(1)[:])
    assert outlines["id"].tolist() == np.unique(labels[labels > 0]).tolist()
    overlap = outline_ious(outlines["id"].tolist(), outlines.geometry, labels, downsample=(2.0, 2.0))
    assert np.mean(list(overlap.values())) >= 0.9
    minx, miny, maxx, maxy = outlines.total_bounds
    assert maxx > 224 and maxy > 256 and maxx <= 448 and maxy <= 512  # level-0 extent, not level 1's
    meta = collection["cellsam_ray"]
    assert meta["segmented_level_downsample"] == [2.0, 2.0] and meta["scale"] == [0.5, 0.5] and meta["unit"] == "micrometer"


def test_the_geojson_is_what_qupath_imports_as_cells_and_matches_the_geoparquet(segmented):
    url, _ = segmented
    outlines, collection = read_outlines(url, "cells")
    assert qupath_problems(collection) == []
    features = collection["features"]
    assert [f["id"] for f in features] == [f["properties"]["label_id"] for f in features] == outlines["id"].tolist()
    first = features[0]["properties"]["measurements"]
    assert {"area", "mean_DAPI", "total_DAPI", "crosses_seam"} <= set(first) and first["crosses_seam"] in (0, 1)
    for feature, geometry in zip(features, outlines.geometry):
        assert shapely.equals(shapely.from_geojson(json.dumps(feature["geometry"])), geometry)
    # The GeoParquet metadata readers rely on.
    geo = json.loads(pq.read_schema(Path(url, "labels", "cells", "cells.geoparquet")).metadata[b"geo"])
    assert geo["version"].startswith("1.") and geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["encoding"] == "WKB" and geo["columns"]["geometry"]["crs"] is None
    assert set(outlines.geom_type) <= set(geo["columns"]["geometry"]["geometry_types"])


def test_outlines_follow_the_cell_table_and_ask_for_it(tmp_path, capsys):
    from cellsam_ray.spec import SegmentSpec

    assert SegmentSpec(input="s.ome.zarr", nuclear=["DAPI"]).outlines
    assert not SegmentSpec(input="s.ome.zarr", nuclear=["DAPI"], cell_table=False).outlines
    url = str(tmp_path / "s.ome.zarr")
    write_synthetic_slide(url, size=(128, 128), channels=1, ngff="0.5", seed=1, chunk=64)
    assert main(["segment", url, "--nuclear", "DAPI", "--no-cell-table", "--outlines"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--outlines needs the cell table" in err
    assert not Path(url, "labels", "cells").exists()  # refused before anything was written
