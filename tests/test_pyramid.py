"""Pyramid levels, chunk by chunk, against direct numpy computations."""

from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import zarr

from cellsam_ray.io import pyramid


def reference_mode(block: np.ndarray) -> int:
    """The rule, spelled out: most frequent non-zero id, ties to the smaller; 0 only if all are 0."""
    votes = Counter(int(v) for v in block.ravel() if v != 0)
    if not votes:
        return 0
    top = max(votes.values())
    return min(v for v, n in votes.items() if n == top)


def test_mean_matches_numpy_on_even_shapes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65535, (3, 64, 48), dtype=np.uint16)
    expected = np.rint(image.reshape(3, 32, 2, 24, 2).astype(np.float64).mean(axis=(2, 4))).astype(np.uint16)
    np.testing.assert_array_equal(pyramid.downsample(image, 2, "image"), expected)


def test_mean_of_partial_blocks_counts_only_real_pixels():
    image = np.array([[1, 3, 10], [5, 7, 20], [100, 100, 7]], dtype=np.float32)
    out = pyramid.downsample(image, 2, "image")
    np.testing.assert_allclose(out, [[4, 15], [100, 7]])


def test_mode_with_foreground_priority():
    blocks = {
        (0, 0, 0, 0): 0,  # all background stays background
        (0, 0, 0, 5): 5,  # any foreground beats background, however outnumbered
        (7, 7, 3, 0): 7,  # majority
        (9, 4, 9, 4): 4,  # tie -> smaller id
        (2, 8, 6, 1): 1,  # all different -> smallest
    }
    image = np.zeros((2, 2 * len(blocks)), np.uint32)
    for k, (a, b, c, d) in enumerate(blocks):
        image[:, 2 * k : 2 * k + 2] = [[a, b], [c, d]]
    assert pyramid.downsample(image, 2, "labels").ravel().tolist() == list(blocks.values())


def test_whole_two_by_two_blocks_follow_the_rule_for_every_pattern():
    """The sort-free path for whole 2×2 blocks, on every block over four ids and background (625)."""
    values = np.array([0, 1, 2, 7, 2**32 - 1], np.uint32)
    blocks = np.array(list(itertools.product(values, repeat=4)), np.uint32)
    image = blocks.reshape(-1, 2, 2).transpose(1, 0, 2).reshape(2, -1)  # block k at columns 2k, 2k+1
    out = pyramid.downsample(image, 2, "labels").ravel()
    assert out.tolist() == [reference_mode(b) for b in blocks]


def test_mode_matches_reference_and_never_invents_ids():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 0, 3, 17, 2**31 + 5], np.uint32), size=(37, 29))
    out = pyramid.downsample(labels, 2, "labels")
    assert out.shape == (19, 15) and out.dtype == np.uint32
    for i in range(19):
        for j in range(15):
            assert out[i, j] == reference_mode(labels[2 * i : 2 * i + 2, 2 * j : 2 * j + 2])
    assert set(np.unique(out)) <= set(np.unique(labels))


def test_factor_three_and_other_axes():
    rng = np.random.default_rng(2)
    image = rng.random((2, 4, 9, 12))
    out = pyramid.downsample(image, 3, "image", axes=(-2, -1))
    np.testing.assert_allclose(out, image.reshape(2, 4, 3, 3, 4, 3).mean(axis=(3, 5)))
    with pytest.raises(ValueError, match="kind"):
        pyramid.downsample(image, 2, "nearest")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_build_pyramid_chunk_by_chunk(tmp_path, zarr_format):
    """Built chunk by chunk (16² chunks, odd shapes), the levels equal downsampling the whole array at once."""
    rng = np.random.default_rng(3)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="w", zarr_format=zarr_format)
    shapes = [(2, 101, 77), (2, 51, 39), (2, 26, 20)]
    image = [group.create_array(f"i{k}", shape=s, dtype="u2", chunks=(1, 16, 16)) for k, s in enumerate(shapes)]
    labels = [group.create_array(f"l{k}", shape=s[1:], dtype="u4", chunks=(16, 16)) for k, s in enumerate(shapes)]
    pixels = rng.integers(0, 4000, shapes[0], dtype=np.uint16)
    cells = np.repeat(np.repeat(rng.integers(0, 50, (51, 39), dtype=np.uint32), 2, 0), 2, 1)[:101, :77]
    image[0][:] = pixels
    labels[0][:] = cells

    pyramid.build_pyramid(image, "image")
    pyramid.build_pyramid(labels, "labels")

    want_image, want_labels = pixels, cells
    for k in (1, 2):
        want_image = pyramid.downsample(want_image, 2, "image")
        want_labels = pyramid.downsample(want_labels, 2, "labels")
        np.testing.assert_array_equal(image[k][:], want_image)
        np.testing.assert_array_equal(labels[k][:], want_labels)
    # The labels were 2x2 constant blocks, so level 1 recovers them exactly.
    np.testing.assert_array_equal(labels[1][:], cells[::2, ::2])
    assert set(np.unique(labels[2][:])) <= set(np.unique(labels[1][:]))


def test_output_chunks_and_shape_check(tmp_path):
    group = zarr.open_group(str(tmp_path / "q.zarr"), mode="w", zarr_format=3)
    source = group.create_array("a", shape=(10, 10), dtype="u1", chunks=(4, 4))
    target = group.create_array("b", shape=(5, 5), dtype="u1", chunks=(4, 4))
    assert list(pyramid.output_chunks(target)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    other = group.create_array("c", shape=(4, 5), dtype="u1", chunks=(4, 4))
    with pytest.raises(ValueError, match="axis maps are for"):
        pyramid.build_chunk(source, other, (0, 0), "labels", pyramid.level_maps((10, 10), (5, 5)))
    pyramid.build_chunk(source, target, (1, 1))  # one chunk alone is a valid unit of work


def test_chunks_as_ray_tasks_on_s3(ray_cluster, s3_prefix, storage_options):
    """The pipeline's use: one Ray task per output chunk, all writing one level on S3 concurrently."""
    from cellsam_ray.io.storage import open_group

    group = open_group(s3_prefix, storage_options, mode="w", zarr_format=3)
    rng = np.random.default_rng(4)
    cells = rng.integers(0, 9, (96, 80), dtype=np.uint32)
    group.create_array("s0", shape=(96, 80), dtype="u4", chunks=(32, 32))[:] = cells
    group.create_array("s1", shape=(48, 40), dtype="u4", chunks=(16, 16))

    @ray_cluster.remote
    def build(chunk):
        g = open_group(s3_prefix, storage_options, mode="r+")
        pyramid.build_chunk(g["s0"], g["s1"], chunk, "labels")

    ray_cluster.get([build.remote(c) for c in pyramid.output_chunks(group["s1"])])
    built = open_group(s3_prefix, storage_options)["s1"][:]
    np.testing.assert_array_equal(built, pyramid.downsample(cells, 2, "labels"))


# ------------------------------------------------------------------------------------ any pyramid
def reference_sources(m: pyramid.AxisMap, i: int) -> list[int]:
    """The mapping rule, spelled out: the sources whose centres lie in a coarser pixel, or the one under a
    finer pixel's centre (the last one past a floor-halved edge)."""
    r = m.ratio
    if r >= 1:
        return [j for j in range(m.source_size) if i * r <= j + Fraction(1, 2) < (i + 1) * r]
    return [min(int((i + Fraction(1, 2)) * r), m.source_size - 1)]


@pytest.mark.parametrize("source, target, ratios", [
    ((101, 131), (50, 65), (2, 2)),  # floor halving (ome-zarr-py, bioformats2raw)
    ((101, 131), (51, 66), (2, 2)),  # ceil halving
    ((100, 90), (33, 30), (3, 3)),  # factor 3, floor
    ((100, 90), (25, 23), (4, 4)),  # factor 4, ceil in x
    ((100, 90), (50, 22), (2, 4)),  # anisotropic
    ((30, 40), (20, 40), (Fraction(3, 2), 1)),  # not a whole factor; x kept
    ((50, 65), (101, 131), (Fraction(1, 2), Fraction(1, 2))),  # a finer level from a floor-halved one
    ((34, 30), (100, 90), (Fraction(1, 3), Fraction(1, 3))),  # a finer level, factor 3
])
def test_every_target_pixel_comes_from_its_source_block(tmp_path, source, target, ratios):
    """Built chunk by chunk (chunks that do not line up with the blocks), each label pixel is the mode of the
    source pixels the rule names, whatever the rounding, factor or direction."""
    maps = pyramid.level_maps(source, target)
    assert tuple(m.ratio for m in maps) == tuple(Fraction(r) for r in ratios)
    rng = np.random.default_rng(5)
    cells = rng.choice(np.array([0, 0, 3, 17, 5, 2**31 + 9], np.uint32), size=source)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="w", zarr_format=3)
    group.create_array("s", shape=source, dtype="u4", chunks=(16, 16))[:] = cells
    out = group.create_array("t", shape=target, dtype="u4", chunks=(13, 11))
    pyramid.build_level(group["s"], out, "labels", maps)
    built = out[:]
    rows = [reference_sources(maps[0], i) for i in range(target[0])]
    cols = [reference_sources(maps[1], j) for j in range(target[1])]
    for i, j in itertools.product(range(target[0]), range(target[1])):
        assert built[i, j] == reference_mode(cells[np.ix_(rows[i], cols[j])]), (i, j)


def test_scales_decide_the_factor_where_the_shapes_allow_several():
    # ome-zarr-py records the shape ratio as the scale (1001 / 500 = 2.002) where it halved by 2.
    assert pyramid.AxisMap.between(1001, 500, 1.0, 2.002).ratio == 2
    assert pyramid.AxisMap.between(125, 62, 8.008, 16.145).ratio == 2
    # 9 → 3 is a factor 3 (floor of 9/3) but also 4 → ceil(9/4) = 3: the scales say which.
    assert pyramid.AxisMap.between(9, 3, 1.0, 3.0).ratio == 3
    assert pyramid.AxisMap.between(9, 3, 1.0, 4.0).ratio == 4
    assert pyramid.AxisMap.between(9, 3).ratio == 3  # equal scales (a careless writer): the sizes decide
    assert pyramid.AxisMap.between(1, 1, 1.0, 2.0).identity  # a one-pixel axis stays one pixel
    with pytest.raises(ValueError, match="cannot be resampled"):
        pyramid.AxisMap.between(10, 0)


def test_target_span_is_what_a_source_region_changes():
    for source, target in ((1001, 500), (1001, 501), (100, 33), (100, 25), (30, 20), (500, 1001), (34, 100)):
        m = pyramid.AxisMap.between(source, target)
        made_from = [set(reference_sources(m, i)) for i in range(target)]
        for first, end in ((0, 1), (0, source), (3, 7), (source - 1, source), (source // 2, source // 2 + 5)):
            touched = [i for i in range(target) if made_from[i] & set(range(first, end))]
            want = (touched[0], touched[-1] + 1) if touched else (0, 0)
            assert m.target_span(first, end) == want, (source, target, first, end)
    floor = pyramid.AxisMap.between(1001, 500)
    assert floor.target_span(0, 4) == (0, 2)
    assert floor.target_span(1000, 1001) == (0, 0)  # the pixel a floor-halving writer dropped
    finer = pyramid.AxisMap.between(500, 1001)
    assert finer.target_span(499, 500) == (998, 1001)
    assert floor.source_span(10, 20) == (20, 40)


def test_a_z_axis_halved_too_and_other_axes_kept(tmp_path):
    """3-D labels whose z is halved as well: each pixel is the mode of its 2×2×2 block."""
    rng = np.random.default_rng(6)
    cells = rng.integers(0, 4, (2, 9, 20, 22), dtype=np.uint16)  # t, z, y, x
    group = zarr.open_group(str(tmp_path / "z.zarr"), mode="w", zarr_format=2)
    group.create_array("s", shape=cells.shape, dtype="u2", chunks=(1, 1, 8, 8))[:] = cells
    target = group.create_array("t", shape=(2, 4, 10, 11), dtype="u2", chunks=(1, 1, 4, 4))
    maps = pyramid.level_maps(cells.shape, target.shape, (1, 2, 1, 1), (1, 4, 2, 2))
    assert [m.ratio for m in maps] == [1, 2, 2, 2]
    pyramid.build_level(group["s"], target, "labels", maps)
    built = target[:]
    for t, z, y, x in itertools.product(range(2), range(4), range(10), range(11)):
        block = cells[t, 2 * z : 2 * z + 2, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2]
        assert built[t, z, y, x] == reference_mode(block)


def test_source_span_is_the_union_of_its_targets_sources():
    """What the driver asks at every event (``driver.streaming``): exactly the sources of every target in the
    range, no more."""
    for source, target in ((1001, 500), (1001, 501), (100, 33), (100, 25), (30, 20), (500, 1001), (34, 100)):
        m = pyramid.AxisMap.between(source, target)
        for start, stop in ((0, 1), (0, target), (3, 7), (target - 1, target), (target // 2, target // 2 + 5)):
            sources = [j for i in range(start, stop) for j in reference_sources(m, i)]
            assert m.source_span(start, stop) == (min(sources), max(sources) + 1), (source, target, start, stop)
