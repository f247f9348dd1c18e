"""The whole-slide pipeline end to end on real parts: synthetic slides, a local Ray cluster, moto S3.

The model is replaced by the ground-truth oracle, so every assertion is about the pipeline: tiling,
seam reconciliation, ids, writes and the label pyramid.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import zarr

from cellsam_ray.driver.api import segment
from cellsam_ray.driver.windows import plan_run
from cellsam_ray.io.ngff import open_image
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import same_up_to_relabelling, validate_ome_zarr
from cellsam_ray.testing.s3 import spec_storage

ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"
# Small tiles so a 512² slide has a 4×4 grid with 9 interior seams; the halo holds the largest cells.
TILING = dict(tile=128, halo=40, band=8, chunk=64)


def image_checksums(url: str, storage_options=None) -> dict[str, str]:
    image = open_image(url, storage_options)
    return {lvl.path: hashlib.sha256(np.asarray(image.array(i)[:]).tobytes()).hexdigest()
            for i, lvl in enumerate(image.levels)}


@pytest.fixture(scope="module")
def slide_v05(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("slides") / "slide.ome.zarr")
    write_synthetic_slide(url, size=(512, 512), channels=3, ngff="0.5", seed=11, chunk=128)
    return url


def run_oracle(url, storage_options=None, **overrides):
    spec = dict(input=url, nuclear=["DAPI"], segmenter=ORACLE, **spec_storage(storage_options),
                **{"segmenter_options": dict(labels=url), **TILING, **overrides})
    return segment(spec, progress=False)


def labels_of(url, name="cells", level=0, storage_options=None):
    return np.asarray(open_image(url, storage_options).label(name).array(level)[:])


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_oracle_slide_is_reproduced_and_valid(tmp_path, ray_cluster, ngff):
    url = str(tmp_path / f"slide-{ngff}.ome.zarr")
    write_synthetic_slide(url, size=(512, 384), channels=2, ngff=ngff, seed=3, chunk=128)
    before = image_checksums(url)
    report = run_oracle(url, whole_cell=["1"])
    truth = labels_of(url, "ground_truth")
    cells = labels_of(url)
    assert same_up_to_relabelling(cells, truth)
    n = len(np.unique(truth)) - 1
    assert report["summary"]["cells"] == n
    assert sorted(np.unique(cells[cells > 0]).tolist()) == list(range(1, n + 1))
    assert report["summary"]["seam_reconciliations"] > 0  # seams were crossed and settled
    # Same levels as the image; every coarser level holds only ids of the level below it.
    image = open_image(url)
    label = image.label("cells")
    assert [lv.shape for lv in label.levels] == [lv.shape[1:] for lv in image.levels]
    for k in range(1, len(label.levels)):
        assert set(np.unique(label.array(k)[:])) <= set(np.unique(label.array(k - 1)[:]))
    validate_ome_zarr(url)
    assert image_checksums(url) == before  # the image's own arrays were never written
    # ome-zarr-py's reader finds both label images with their pixels.
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(url, fmt=FormatV04() if ngff == "0.4" else FormatV05()))())
    found = {n.zarr.path.rstrip("/").split("/")[-1]: n for n in nodes if n.load(Label)}
    assert set(found) == {"cells", "ground_truth"}
    assert np.array_equal(np.asarray(found["cells"].data[0]), cells)


def test_output_is_identical_for_any_worker_count_and_batch(tmp_path, ray_cluster, slide_v05):
    outputs = []
    for workers, batch in ((1, 4), (2, 1)):
        run_oracle(slide_v05, workers=workers, batch_size=batch, label_name=f"w{workers}",
                   tissue_mask=False)
        outputs.append([labels_of(slide_v05, f"w{workers}", k) for k in range(2)])
    for a, b in zip(*outputs):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_rerun_refuses_existing_labels_unless_overwrite(tmp_path, ray_cluster, slide_v05):
    from cellsam_ray.errors import UserError

    run_oracle(slide_v05, label_name="again")
    first = labels_of(slide_v05, "again")
    with pytest.raises(UserError, match="already exists"):
        run_oracle(slide_v05, label_name="again")
    report = run_oracle(slide_v05, label_name="again", overwrite=True)
    assert report["summary"]["tiles_resumed"] == 0
    assert np.array_equal(labels_of(slide_v05, "again"), first)


def test_segment_on_s3(s3_prefix, storage_options, ray_cluster):
    url = f"{s3_prefix}/slide.ome.zarr"
    write_synthetic_slide(url, size=(256, 384), channels=3, ngff="0.5", seed=5, chunk=64,
                          storage_options=storage_options)
    before = image_checksums(url, storage_options)
    report = run_oracle(url, storage_options=storage_options, whole_cell=["1", "2"])
    assert report["summary"]["cells"] > 20
    cells = labels_of(url, storage_options=storage_options)
    truth = labels_of(url, "ground_truth", storage_options=storage_options)
    assert same_up_to_relabelling(cells, truth)
    validate_ome_zarr(url, storage_options)
    assert image_checksums(url, storage_options) == before
    # The work prefix is gone once the run completed; the report is beside the labels.
    root = zarr.open_group(url, mode="r", storage_options=storage_options)
    assert "work" not in list(root["labels/cells"].keys())


def test_segmenting_a_coarser_level_fills_every_label_level(tmp_path, ray_cluster, slide_v05):
    run_oracle(slide_v05, level=1, label_name="coarse", tile=64, halo=24, band=6, chunk=32,
               segmenter_options=dict(labels=slide_v05, level=1))
    truth1 = labels_of(slide_v05, "ground_truth", level=1)
    coarse = open_image(slide_v05).label("coarse")
    assert same_up_to_relabelling(np.asarray(coarse.array(1)[:]), truth1)
    level0 = np.asarray(coarse.array(0)[:])
    # Level 0 is level 1 repeated 2×2: the same cells, nothing interpolated.
    assert np.array_equal(level0[::2, ::2], np.asarray(coarse.array(1)[:]))


def test_cores_cover_every_label_chunk_exactly_once(slide_v05):
    plan = plan_run(SegmentSpec(input=slide_v05, nuclear=["DAPI"], segmenter=ORACLE,
                                segmenter_options=dict(labels=slide_v05), tissue_mask=False, **TILING))
    owners: dict[tuple[int, int], int] = {}
    c = plan.spec.chunk
    for t in plan.grid.tiles():
        for cy in range(t.core_y0, t.core_y1, c):
            for cx in range(t.core_x0, t.core_x1, c):
                assert (cy % c, cx % c) == (0, 0)
                assert (cy // c, cx // c) not in owners
                owners[(cy // c, cx // c)] = 1
    h, w = plan.label_shapes[0]
    assert len(owners) == -(-h // c) * -(-w // c)


def test_tczyx_image_with_a_chosen_plane(tmp_path, ray_cluster):
    from cellsam_ray.io import pyramid
    from cellsam_ray.io.ngff import Channel, create_image, image_axes
    from cellsam_ray.synth.tissue import TissueModel

    region = TissueModel((256, 256), seed=4, channels=2).render(0, 256, 0, 256)
    url = str(tmp_path / "stack.ome.zarr")
    image = create_image(url, shape=(1, 2, 3, 256, 256), dtype=np.uint16, chunks=(1, 1, 1, 64, 64),
                         axes=image_axes("tczyx"), scale=(1, 1, 2.0, 0.5, 0.5), levels=2, version="0.4",
                         channels=[Channel("DAPI"), Channel("CD45")])
    image.array(0)[0, :, 1] = region.image  # the cells are in plane z=1 only
    pyramid.build_pyramid(image.arrays(), "image")
    truth_path = tmp_path / "truth.npy"
    np.save(truth_path, region.labels)
    spec = dict(input=url, nuclear=["DAPI"], whole_cell=["CD45"], segmenter=ORACLE,
                segmenter_options=dict(labels=str(truth_path)), z=1, **TILING)
    segment(spec, progress=False)
    cells = np.asarray(open_image(url).label("cells").array(0)[:])
    assert cells.shape == (1, 3, 256, 256)
    assert same_up_to_relabelling(cells[0, 1], region.labels)
    assert not cells[0, 0].any() and not cells[0, 2].any()
    validate_ome_zarr(url)


def test_tiles_without_tissue_are_skipped_and_reported(tmp_path, ray_cluster):
    url = str(tmp_path / "sparse.ome.zarr")
    write_synthetic_slide(url, size=(256, 512), channels=2, ngff="0.5", seed=8, chunk=64)
    image = open_image(url, mode="r+")
    for k in range(len(image.levels)):  # glass on the right half: no signal, no cells
        arr, gt = image.array(k), image.label("ground_truth").array(k)
        arr[:, :, arr.shape[2] // 2 :] = 0
        gt[:, gt.shape[1] // 2 :] = 0
    report = run_oracle(url)
    assert report["summary"]["tiles_skipped_no_tissue"] >= 2
    assert same_up_to_relabelling(labels_of(url), labels_of(url, "ground_truth"))
