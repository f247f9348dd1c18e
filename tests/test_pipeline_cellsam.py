"""CellSAM end to end through the whole-slide pipeline, with the golden tiny checkpoint."""

from __future__ import annotations


import numpy as np
import pytest

from cellsam_ray.driver.api import segment
from cellsam_ray.io.ngff import open_image
from cellsam_ray.model.cellsam import CellSAMSegmenter, cellsam_layout
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import reference_dir, validate_ome_zarr

GOLDEN = reference_dir() / "golden"


@pytest.fixture(scope="module")
def tiny():
    return dict(weights=str(GOLDEN / "tiny_cellsam.pt"), config=str(GOLDEN / "tiny_config.json"))


def test_cellsam_segments_a_slide_end_to_end(tmp_path, ray_cluster, tiny):
    url = str(tmp_path / "slide.ome.zarr")
    write_synthetic_slide(url, size=(384, 384), channels=3, ngff="0.5", seed=2, chunk=64)
    report = segment(dict(input=url, nuclear=["DAPI"], whole_cell=["1"], tile=128, halo=32, band=8, chunk=64,
                          device="cpu", **tiny), progress=False)
    labels = np.asarray(open_image(url).label("cells").array(0)[:])
    n = report["summary"]["cells"]
    assert n > 0
    assert (report["model"]["window"], report["model"]["model_input"], report["model"]["scale"]) == (192, 1024, "custom")
    assert sorted(np.unique(labels[labels > 0]).tolist()) == list(range(1, n + 1))
    validate_ome_zarr(url)


def test_segmenter_answers_with_the_per_tile_cellsam_labels(tiny):
    """The contract's masks are exactly the cells of the fast per-tile pipeline's label image."""
    from cellsam_ray.model.fast import segment_tile_fast

    model = load_cellsam(tiny["weights"], tiny["config"])
    window = np.load(GOLDEN / "two_channel_300x200_norm.input.npy").astype(np.float32)
    window = np.moveaxis(window / window.max(), -1, 0)[:, :192, :192].copy()
    result = CellSAMSegmenter(model, mode="fast").segment(window, origin=(0, 0))
    tile = segment_tile_fast(cellsam_layout(window), model, normalize=False)
    painted = np.zeros(tile.labels.shape, np.int32)
    for k, (box, mask) in enumerate(zip(result["boxes"], result["masks"]), start=1):
        x1, y1, x2, y2 = box.astype(int)
        painted[y1:y2, x1:x2][mask] = k
    assert len(result["masks"]) == tile.labels.max()
    assert np.array_equal(painted > 0, tile.labels > 0)
    assert len(np.unique(np.stack([painted.ravel(), tile.labels.ravel()]), axis=1).T) == tile.labels.max() + 1
    # Each cell carries the score and predicted IoU of the box whose mask painted it.
    np.testing.assert_array_equal(result["scores"], tile.scores[tile.cell_rows])
    np.testing.assert_array_equal(result["ious"], tile.ious[tile.cell_rows])
    assert len(set(tile.cell_rows.tolist())) == len(tile.cell_rows)
