"""Few-shot fine-tuning: 5 labelled tiles of a differently styled input improve the bundled model on it.

The bundled model was trained with DAPI as the nuclear channel and E-cadherin (a membrane outline on
every cell) as the whole-cell channel. The new style hands it the same kind of tissue with the roles the
other way round: the membrane marker in the nuclear channel and DAPI in the whole-cell channel, as a
panel whose channels were assigned differently would. The bundled model scores F1 0.000 on it (0.932 on
the usual roles of the same slide); fine-tuning on 5 tiles of another slide raised that to 0.261 when
measured (seed 0, 60 steps). Tiles for tuning and for scoring come from two slides with different seeds,
neither a training seed of the bundled model. (Earlier bundled models: 0.005 → 0.272 and 0.045 → 0.070.)

A whole-cell role taken from cytoplasmic and immune markers (Pan-Cytokeratin, Vimentin, CD45) was tried
first, with the first bundled model, and is not used: that model scored the same on it as on its own
style (0.123), and 60 fine-tuning steps did not improve it (0.120, or 0.106 at a higher learning rate).
It has not been re-tried with the current model.

Marked slow: 60 optimiser steps plus reference inference on 18 tiles take about 70 s on the
project's 2 CPU cores when nothing else runs, and two or three times that when they are shared.
"""

from __future__ import annotations

import pytest

from cellsam_ray import bundled
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.train.data import DataSpec, load_images
from cellsam_ray.train.fit import fit
from cellsam_ray.train.loop import TrainSettings
from cellsam_ray.train.validate import score_tiles

NEW_STYLE = dict(nuclear=["E-cadherin"], whole_cell=["DAPI"])
MARGIN = 0.1
"""F1 the fine-tuned model must gain on the new style (measured: +0.261, from 0.000 to 0.261)."""


@pytest.mark.slow
def test_five_tiles_of_a_new_style_improve_f1_on_that_style(tmp_path):
    slides = {}
    for role, seed in (("tune", 41), ("score", 42)):
        slides[role] = str(tmp_path / f"{role}.ome.zarr")
        write_synthetic_slide(slides[role], size=(768, 768), channels=6, seed=seed, chunk=128)
    scored = load_images(DataSpec(slides=[slides["score"]], **NEW_STYLE), 256)
    before = score_tiles(load_cellsam(str(bundled.WEIGHTS), str(bundled.CONFIG)), scored)

    five = DataSpec(slides=[slides["tune"]], **NEW_STYLE, max_tiles=5)
    settings = TrainSettings(init=str(bundled.WEIGHTS), config=str(bundled.CONFIG), steps=60, batch_size=2,
                             lr=3e-4, lr_trunk=3e-4, warmup=5, masks_per_image=8)
    tuned = fit(settings, five, tmp_path / "tuned", log=lambda line: None)
    after = score_tiles(tuned, scored)
    assert after.f1 >= before.f1 + MARGIN, (before, after)
