"""Planning a level too large to load: the overview is exact block means, read chunk by chunk in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zarr

from cellsam_ray.driver.windows import plan_run
from cellsam_ray.pipeline import overview as overview_module
from cellsam_ray.pipeline import plan as plan_module
from cellsam_ray.pipeline.overview import overview
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.testing.ecosystem import disc_cells, fluorescence, write_with_ome_zarr_py

ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"


def block_means(pixels: np.ndarray, s: int) -> np.ndarray:
    c, h, w = pixels.shape
    padded = np.full((c, -(-h // s) * s, -(-w // s) * s), np.nan)
    padded[:, :h, :w] = pixels
    return np.nanmean(padded.reshape(c, padded.shape[1] // s, s, padded.shape[2] // s, s), axis=(2, 4))


@pytest.mark.parametrize("chunks, max_pixels", [((1, 1, 30, 70), 40 * 40), ((1, 1, 64, 64), 10**6),
                                                ((1, 1, 17, 1000), 25 * 25)])
def test_overview_is_the_block_mean_whatever_the_chunks(chunks, max_pixels):
    """Blocks that straddle chunks (30×70 chunks, stride 5), a stride of 1, chunks wider than reads."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60000, (3, 1, 203, 191), dtype=np.uint16)  # c, z, y, x
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=pixels.shape, dtype="u2", chunks=chunks)
    array[:] = pixels
    picture, stride = overview(array, ("c", "z", "y", "x"), {"z": 0}, [2, 0], max_pixels)
    assert stride == max(1, int(np.ceil(np.sqrt(203 * 191 / max_pixels))))
    assert picture.shape[1] * picture.shape[2] <= max_pixels
    np.testing.assert_allclose(picture, block_means(pixels[[2, 0], 0].astype(np.float64), stride), rtol=1e-6)
    if stride == 1:  # a level that fits is the picture itself, value for value
        assert picture.dtype == np.float32
        np.testing.assert_array_equal(picture, pixels[[2, 0], 0].astype(np.float32))


def test_nan_is_background_in_the_overview():
    pixels = np.ones((1, 40, 40), dtype=np.float32)
    pixels[0, :20] = np.nan
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=pixels.shape, dtype="f4", chunks=(1, 16, 16))
    array[:] = pixels
    picture, stride = overview(array, ("c", "y", "x"), {}, [0], 4 * 4)
    assert stride == 10 and np.isfinite(picture).all()
    np.testing.assert_array_equal(picture[0], [[0] * 4, [0] * 4, [1] * 4, [1] * 4])


def test_planning_a_single_level_image_never_holds_the_level(tmp_path, monkeypatch):
    """A 2-channel 2048² single-level image (16 MiB of the chosen channels) is planned holding a small
    fraction of it at any time (the overview and the reads in flight, made small here so that the level
    need not be large), and the tiles without tissue are still found."""
    monkeypatch.setattr(plan_module, "COARSE_PIXELS", 128 * 128)
    monkeypatch.setattr(overview_module, "READ_PIXELS", 256)  # reads of 256² px, at most 4 in flight
    monkeypatch.setattr(overview_module, "READERS", 2)
    tissue = np.zeros((2048, 2048), dtype=bool)
    tissue[:1024, :1024] = True
    truth = disc_cells((2048, 2048), seed=7, where=tissue)
    url = str(tmp_path / "single.ome.zarr")
    write_with_ome_zarr_py(url, fluorescence(truth, 2, np.uint16, seed=7), version="0.5",
                           channel_names=["DAPI", "CD45"], chunks=(1, 256, 256), scale_factors=[])
    del truth, tissue
    spec = SegmentSpec(input=url, nuclear=["DAPI"], whole_cell=["CD45"], segmenter=ORACLE,
                       segmenter_options=dict(labels=url), tile=512, halo=64, chunk=64)
    tracemalloc.start()
    try:
        plan = plan_run(spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    level_bytes = 2 * 2048 * 2048 * 2
    assert peak < level_bytes / 4, f"planning held {peak / 2**20:.1f} MiB of a {level_bytes / 2**20:.0f} MiB level"
    assert {(t.row, t.col) for t in plan.tiles} == {(r, c) for r in range(3) for c in range(3)}
    assert plan.skipped == 16 - 9
