"""QC pictures: colours and outlines drawn where they belong, the overview from a coarse level with the
matching label level's outlines, seam crops that show the seams, and PNGs written beside the report."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import find_boundaries

from cellsam_ray.driver.api import segment
from cellsam_ray.driver.windows import plan_run
from cellsam_ray.io.ngff import open_image
from cellsam_ray.pipeline.intensity import ChannelScale
from cellsam_ray.qc import render, views
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.s3 import spec_storage

ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"
TILING = dict(tile=128, halo=40, band=8, chunk=64)
WHITE, YELLOW = render.OUTLINE, render.SEAM


def png(path: str, storage_options=None) -> np.ndarray:
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))


def test_composite_gives_each_channel_its_colour():
    pixels = np.zeros((2, 3, 3), dtype=np.uint16)
    pixels[0, 0, 0] = 1000  # channel 0 at its top: its colour exactly
    pixels[1, 1, 1] = 500  # channel 1 at half its range
    pixels[:, 2, 2] = 1000  # both: colours add, clipped
    rgb = render.composite(pixels, [ChannelScale(0, 1000)] * 2, [(0, 96, 255), (0, 255, 0)])
    assert rgb[0, 0].tolist() == [0, 96, 255]
    assert rgb[1, 1].tolist() == [0, 128, 0]
    assert rgb[2, 2].tolist() == [0, 255, 255]
    assert rgb[0, 1].tolist() == [0, 0, 0]


def test_crossing_cells_and_seams():
    labels = np.zeros((8, 8), dtype=np.uint32)
    labels[1:3, 2:6] = 1  # crosses the vertical seam at column 4
    labels[5:7, 0:3] = 2  # stays left of it
    assert render.crossing_ids(labels, rows=[], cols=[4]).tolist() == [1]
    drawn = render.draw_seams(np.zeros((8, 8, 3), np.uint8), rows=[], cols=[4], dash=2, width=2)
    assert (drawn[0, 3:5] == YELLOW).all() and (drawn[2, 3:5] == 0).all()  # dashed, straddling the seam
    outlined = render.draw_outlines(np.zeros((8, 8, 3), np.uint8), labels)
    assert (outlined[labels == 0] == 0).all() and (outlined[1, 2] == WHITE).all()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("qc") / "slide.ome.zarr")
    write_synthetic_slide(url, size=(512, 384), channels=3, ngff="0.5", seed=6, chunk=64)
    return url


def test_overview_is_a_coarse_level_with_its_own_outlines(slide, monkeypatch):
    """No Ray: the slide's ground truth stands in for a run's labels."""
    monkeypatch.setattr(views, "OVERVIEW_SIZE", 300)
    plan = plan_run(SegmentSpec(input=slide, nuclear=["DAPI"], whole_cell=["1"], label_name="ground_truth",
                                 segmenter=ORACLE, segmenter_options=dict(labels=slide), **TILING))
    counts = {(r, c): (10 + r + c, 3 if (r, c) in [(1, 1), (1, 2)] else 0)
              for r in range(plan.grid.rows) for c in range(plan.grid.cols)}
    qc = views.write_qc_images(plan, counts)
    by_kind = {}
    for entry in qc["images"]:
        by_kind.setdefault(entry["kind"], []).append(entry)
    assert [len(by_kind[k]) for k in ("overview", "tile", "seam")] == [1, 2, 2]

    overview = by_kind["overview"][0]
    assert overview["level"] == 1  # 512×384 does not fit 300 px; level 1 (256×192) does
    rgb = png(f"{slide}/labels/ground_truth/{overview['path']}")
    image = open_image(slide)
    labels = np.asarray(image.label("ground_truth").array(1)[:])
    assert rgb.shape == labels.shape + (3,) == (256, 192, 3)
    edges = find_boundaries(labels, mode="inner") & (labels > 0)
    assert edges.sum() > 1000 and (rgb[edges] == WHITE).all()  # every cell edge of label level 1 is drawn
    # Elsewhere, each shown channel in its colour: DAPI blue, the whole-cell channel green, the next red.
    assert [c["colour"] for c in qc["channels"]] == ["#0060ff", "#00ff00", "#ff0000"]
    raw = np.asarray(image.array(1)[:]).astype(np.float32)
    expected = np.zeros(raw.shape[1:] + (3,), np.float32)
    for channel, colour in zip(raw, render.PALETTE):
        low, high = np.percentile(channel[channel > 0], [1.0, 99.8])
        expected += np.clip((channel - low) / (high - low), 0, 1)[..., None] * np.array(colour) / 255
    expected = np.clip(expected, 0, 1) * 255
    assert np.abs(rgb[~edges].astype(np.float32) - expected[~edges]).max() <= 1.0

    # Tiles with the most cells; seams where copies were reconciled, zoomed, dashed and tinted.
    assert [t["tile"] for t in by_kind["tile"]] == ["r00003_c00002", "r00002_c00002"]
    seam = by_kind["seam"][0]
    assert seam["corner"] == [256, 256] and seam["region"] == [192, 192, 320, 320] and seam["zoom"] == 4
    crop = png(f"{slide}/labels/ground_truth/{seam['path']}")
    assert crop.shape == (512, 512, 3) == tuple(seam["size"]) + (3,)
    assert (crop[0:6, 255:257] == YELLOW).all() and (crop[255:257, 0:6] == YELLOW).all()  # seams at 64 px × 4
    assert seam["cells_crossing"] > 5


def test_a_run_writes_the_pictures_beside_its_report(s3_prefix, storage_options, ray_cluster):
    url = f"{s3_prefix}/slide.ome.zarr"
    write_synthetic_slide(url, size=(256, 384), channels=3, ngff="0.5", seed=5, chunk=64,
                          storage_options=storage_options)
    report = segment(dict(input=url, nuclear=["DAPI"], segmenter=ORACLE, segmenter_options=dict(labels=url),
                          **spec_storage(storage_options), **TILING), progress=False)
    assert report["summary"]["qc_overview"] == f"{url}/labels/cells/qc/overview.png"
    for entry in report["qc"]["images"]:
        rgb = png(f"{url}/labels/cells/{entry['path']}", storage_options)
        assert list(rgb.shape[:2]) == entry["size"]
        assert (rgb == WHITE).all(axis=-1).sum() > 100  # outlines drawn
    assert {e["kind"] for e in report["qc"]["images"]} == {"overview", "tile", "seam"}
    # The table went to S3 too, beside the report.
    import pyarrow.parquet as pq

    with fsspec.open(report["summary"]["cell_table"], "rb", **storage_options) as f:
        assert pq.read_table(f).num_rows == report["summary"]["cells"]
