import numpy as np

from cellsam_ray.pipeline.intensity import ChannelScale, channel_scales, combine_roles, tissue_mask
from cellsam_ray.pipeline.plan import tiles_with_tissue
from cellsam_ray.tiling import plan_grid


def test_scales_come_from_nonzero_percentiles_and_survive_constant_channels():
    coarse = np.zeros((3, 50, 50), np.uint16)
    coarse[0] = np.arange(2500).reshape(50, 50)
    coarse[1, :10] = 7  # constant where non-zero
    scales = channel_scales(coarse)
    values = np.arange(1, 2500)
    assert scales[0].low == np.percentile(values, 1.0) and scales[0].high == np.percentile(values, 99.8)
    assert scales[1].high > scales[1].low  # no division by zero later
    assert scales[2] == ChannelScale(0.0, 1.0)  # an empty channel


def test_a_role_is_the_max_of_its_channels_after_normalising_each():
    pixels = np.array([[[0, 50, 100]], [[100, 300, 500]], [[9, 9, 9]]], dtype=np.uint16)
    scales = [ChannelScale(0, 100), ChannelScale(100, 500), ChannelScale(0, 9)]
    out = combine_roles(pixels, [[0, 1], [2]], scales)
    assert out.dtype == np.float32 and out.shape == (2, 1, 3)
    assert np.allclose(out[0, 0], [0.0, 0.5, 1.0])  # max(0, 0), max(.5, .5), max(1, 1)
    assert np.allclose(out[1, 0], [1.0, 1.0, 1.0])


def test_tissue_mask_finds_tissue_and_tiles_without_it_are_skipped():
    signal = np.zeros((64, 64), np.float32)
    signal[:, :20] = np.random.default_rng(0).uniform(0.3, 1.0, (64, 20))
    mask = tissue_mask(signal)
    assert mask[:, :18].all() and not mask[:, 40:].any()
    grid = plan_grid(256, 256, tile=64, halo=16, chunk=32, band=4)  # mask is 4× coarser than the level
    kept = tiles_with_tissue(grid.tiles(), mask, 256, 256)
    assert {t.col for t in kept} == {0, 1} and len(kept) == 8
    assert tissue_mask(np.full((32, 32), 0.5, np.float32)).all()  # no contrast: nothing is skipped
