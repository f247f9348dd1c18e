"""Window geometry for CellSAM weights: the published 512-px windows by default, native ones on request.

Checked through the plan the pipeline runs (``driver.windows.plan_run``), on a real slide and a real (small) PyTorch
file standing in for the v1.2 checkpoint: every key and shape of v1.2, each tensor one value broadcast to
its shape (planning checks the keys and shapes, and reads no tensor's bytes).
"""

from __future__ import annotations

import pytest
import torch

from cellsam_ray.driver.windows import plan_run
from cellsam_ray.model import geometry
from cellsam_ray.model.config import load_config
from cellsam_ray.model.network import build_cellsam
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.tiling import plan_grid


@pytest.fixture(scope="module")
def slide_and_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("geometry")
    url = str(folder / "slide.ome.zarr")
    write_synthetic_slide(url, size=(1200, 1000), channels=2, ngff="0.5", seed=3, chunk=128)
    weights = folder / "v12.pt"
    with torch.device("meta"):
        shapes = build_cellsam(load_config("v1.2")).state_dict()
    torch.save({key: torch.zeros((), dtype=v.dtype).expand(v.shape) for key, v in shapes.items()}, weights)
    return url, str(weights)


def _plan(slide_and_weights, **options):
    url, weights = slide_and_weights
    spec = SegmentSpec(input=url, nuclear=["DAPI"], weights=weights, tissue_mask=False, **options)
    return plan_run(spec)


def test_v12_windows_are_the_published_512_px_by_default(slide_and_weights):
    plan = _plan(slide_and_weights)
    grid = plan.grid
    assert (grid.tile, grid.halo, plan.spec.chunk, grid.window_size) == (384, 64, 384, 512)
    assert all(t.window_size == 512 for t in plan.tiles) and len(plan.tiles) == 4 * 3  # 1200/384, 1000/384
    assert geometry.describe(plan.grid.window_size, 1024) == dict(window=512, model_input=1024, scale="published")


def test_native_scale_and_explicit_tiling(slide_and_weights):
    native = _plan(slide_and_weights, scale="native")
    assert (native.grid.tile, native.grid.halo, native.spec.chunk, native.grid.window_size) == (768, 128, 384, 1024)
    assert geometry.describe(native.grid.window_size, 1024)["scale"] == "native"
    mine = _plan(slide_and_weights, halo=32)  # a given halo stays; the rest follows the scale
    assert (mine.grid.tile, mine.grid.halo, mine.grid.window_size) == (384, 32, 448)
    assert geometry.describe(mine.grid.window_size, 1024)["scale"] == "custom"


@pytest.mark.parametrize("image_size", [256, 512, 1024, 2048])
@pytest.mark.parametrize("scale", sorted(geometry.SCALES))
def test_every_derived_geometry_keeps_the_seam_guarantees(image_size, scale):
    core, halo, chunk = geometry.window_geometry(image_size, scale)
    assert core + 2 * halo == image_size // geometry.SCALES[scale]
    plan_grid(4000, 4000, tile=core, halo=halo, chunk=chunk, band=16)  # raises if a guarantee breaks
