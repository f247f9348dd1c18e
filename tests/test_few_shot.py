"""Few-shot fine-tuning: `cellsam-ray finetune` on 8 labelled tiles of a style the bundled model was never
trained on improves it on the rest of that image, and reports its held-back validation split.

The new style is ``envelope`` (``synth.styles``): a nuclear-envelope stain (Lamin-B1), so nuclei show as
bright rims around dim insides, where every nuclear stain the bundled model saw fills the nucleus. It is
kept out of the bundled model's training on purpose (``styles.TRAINING_STYLES``). As a user with their
own annotated tiles would: one 1024² image (a seed no training used) is cut into 16 tiles of 256 px; the
8 of its top half go to ``finetune`` as a folder of image + label pairs (its defaults: 60 steps, 2 of the
8 held back for the validation it reports); the 8 of the bottom half, never shown to it, measure the gain.
Tiles are scaled as the pipeline scales a slide (``--no-normalize``), the input the bundled model knows.

Measured with the shipped model (stage 5) on the project's 2-vCPU VM (no GPU): F1 0.787 before and 0.920
after on the unseen half; the validation pair 0.779 -> 0.897. The whole test took 79 s on quiet cores
(255 and 273 s with stage 4 while an evaluation ran beside it: the 60 steps are most of it), so it stays
in CI, unmarked. Stage 4, which knew this style less well, went from 0.555 to 0.893.
"""

from __future__ import annotations

import json

import numpy as np

from cellsam_ray.cli import main
from cellsam_ray.commands.finetune import DEFAULTS
from cellsam_ray.model import bundled
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.synth.styles import TRAINING_STYLES, render_style
from cellsam_ray.train.data import LabelledImage
from cellsam_ray.train.synthetic import scaled_roles
from cellsam_ray.train.validate import score_tiles

STYLE, SEED, SIDE, TILE = "envelope", 41, 1024, 256
GAIN = 0.1
"""F1 the fine-tuned model must gain on the unseen half (measured: +0.133 from stage 5; +0.338 from stage 4,
which started lower)."""


def tiles_of(seed: int) -> list[LabelledImage]:
    """The image's 16 tiles in row order, nuclear slot filled (CellSAM layout), with their true nuclei."""
    drawn = render_style(STYLE, (SIDE, SIDE), seed)
    nuclear, _ = scaled_roles(drawn)
    tiles = []
    for y in range(0, SIDE, TILE):
        for x in range(0, SIDE, TILE):
            image = np.zeros((TILE, TILE, 3), np.float32)
            image[..., 1] = nuclear[y : y + TILE, x : x + TILE]
            tiles.append(LabelledImage(image, drawn.labels[y : y + TILE, x : x + TILE].astype(np.int32)))
    return tiles


def test_eight_tiles_of_a_new_style_improve_f1_on_the_rest_of_the_image(tmp_path, capsys):
    assert STYLE not in TRAINING_STYLES
    tiles = tiles_of(SEED)
    tune, unseen = tiles[:8], tiles[8:]
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i, tile in enumerate(tune):  # (nuclear, whole-cell) channels last, as segment-image takes two
        np.save(folder / f"t{i}.npy", tile.image[..., 1:])
        np.save(folder / f"t{i}_labels.npy", tile.labels)
    before = score_tiles(load_cellsam(str(bundled.WEIGHTS), str(bundled.CONFIG)), unseen)

    out = tmp_path / "tuned"
    assert main(["finetune", str(out), "--folder", str(folder), "--no-normalize"]) == 0
    printed = capsys.readouterr().out
    assert "starting from the bundled demo model" in printed and "2 held back for validation" in printed
    report = json.loads((out / "validation.json").read_text())
    assert report["tiles"] == DEFAULTS["validation_tiles"] == 2
    assert report["after"]["f1"] > report["before"]["f1"]

    after = score_tiles(load_cellsam(str(out / "cellsam.pt"), str(out / "config.json")), unseen)
    print(f"\nunseen half: F1 {before.f1:.3f} before, {after.f1:.3f} after; validation {report['before']['f1']:.3f} "
          f"-> {report['after']['f1']:.3f}")
    assert after.f1 >= before.f1 + GAIN, (before, after)
