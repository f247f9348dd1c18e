"""Pyramid levels, chunk by chunk, against direct numpy computations."""

from __future__ import annotations

from collections import Counter

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
    np.testing.assert_array_equal(pyramid.mean_downsample(image, 2), expected)


def test_mean_of_partial_blocks_counts_only_real_pixels():
    image = np.array([[1, 3, 10], [5, 7, 20], [100, 100, 7]], dtype=np.float32)
    out = pyramid.mean_downsample(image, 2)
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
    assert pyramid.mode_downsample(image, 2).ravel().tolist() == list(blocks.values())


def test_mode_matches_reference_and_never_invents_ids():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 0, 3, 17, 2**31 + 5], np.uint32), size=(37, 29))
    out = pyramid.mode_downsample(labels, 2)
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
        want_image = pyramid.mean_downsample(want_image, 2)
        want_labels = pyramid.mode_downsample(want_labels, 2)
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
    wrong = group.create_array("c", shape=(4, 5), dtype="u1", chunks=(4, 4))
    with pytest.raises(ValueError, match="not source"):
        pyramid.build_chunk(source, wrong, (0, 0))
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
        pyramid.build_chunk(g["s0"], g["s1"], chunk, 2, "labels")

    ray_cluster.get([build.remote(c) for c in pyramid.output_chunks(group["s1"])])
    np.testing.assert_array_equal(open_group(s3_prefix, storage_options)["s1"][:], pyramid.mode_downsample(cells, 2))
