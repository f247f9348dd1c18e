"""The run's windows are decided in one place (``driver.windows``): the spec's own tile/halo/chunk stay, and
the model decides the rest: the bundled model its own windows or windows sized to the cells, CellSAM weights
those of their input and --scale, another segmenter ``OTHER_SEGMENTER``. Decisions that need no slide are
checked directly; a first look at the cells and the resume of an unfinished run on real slides
(tests/test_cell_size.py), CellSAM weights' scales through the plan (tests/test_model_geometry.py)."""

from __future__ import annotations

import pytest

from cellsam_ray.driver import windows
from cellsam_ray.errors import UserError
from cellsam_ray.model import bundled
from cellsam_ray.spec import SegmentSpec


def decided(**fields) -> SegmentSpec:
    """The spec's windows as the run decides them, for every case that needs no look at the slide."""
    spec, own = windows.choose_model(SegmentSpec(input="s.zarr", nuclear=["DAPI"], **fields))
    return windows.decide(spec, survey=None, own_windows=own)[0]


def tiling(spec: SegmentSpec) -> tuple[int, int, int]:
    return spec.tile, spec.halo, spec.chunk


def test_without_weights_the_run_takes_the_bundled_model_and_its_windows():
    spec = decided(halo=48)
    assert (spec.weights, spec.model_config_name) == (str(bundled.WEIGHTS), str(bundled.CONFIG))
    assert tiling(spec) == (bundled.TILE, 48, bundled.CHUNK)  # an explicit halo stays
    auto, _ = windows.choose_model(SegmentSpec(input="s.zarr", nuclear=["DAPI"]))
    assert auto.cell_diameter == "auto" and tiling(auto) == (None, None, None)  # decided after a look
    with pytest.raises(UserError, match="--config gives the sizes of --weights"):
        decided(config="v1.2")


def test_cellsam_weights_take_the_windows_of_their_input_and_scale():
    assert decided(weights="w.pt").model_config_name == "v1.2"
    assert tiling(decided(weights="w.pt")) == (384, 64, 384)
    assert tiling(decided(weights="w.pt", scale="native")) == (768, 128, 384)
    assert tiling(decided(weights="w.pt", tile=768)) == (768, 64, 384)  # the given tile stays
    own = decided(weights="w.pt", config=str(bundled.CONFIG))  # a checkpoint of the bundled sizes, --scale
    assert tiling(own) == (96, 16, 96)


def test_another_segmenter_takes_its_default_windows_unless_given():
    assert tiling(decided(segmenter="m:f")) == (768, 128, 256) == tuple(windows.OTHER_SEGMENTER.values())
    assert tiling(decided(segmenter="m:f", tile=128, halo=40, chunk=64)) == (128, 40, 64)
    assert decided(segmenter="m:f").weights is None


def test_a_given_diameter_sizes_the_bundled_models_windows():
    given = decided(cell_diameter=30)
    assert tiling(given) == bundled.tiling_for(30) == (288, 48, 96)
    tuned = decided(weights="tuned.pt", config=str(bundled.CONFIG), cell_diameter=60)
    assert tuned.weights == "tuned.pt" and tiling(tuned) == bundled.tiling_for(60)


@pytest.mark.parametrize("fields, message", [
    (dict(cell_diameter=40, halo=48), "give --cell-diameter or --halo, not both"),
    (dict(cell_diameter="auto", segmenter="cellsam_ray.testing.oracle:GroundTruthSegmenter"), "another --segmenter"),
    (dict(cell_diameter=40, weights="w.pt"), "for these weights choose --scale or --tile/--halo"),
])
def test_a_diameter_that_cannot_size_the_windows_is_refused(fields, message):
    with pytest.raises(UserError, match=message):
        windows.choose_model(SegmentSpec(input="s.zarr", nuclear=["DAPI"], **fields))
