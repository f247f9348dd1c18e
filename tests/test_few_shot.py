"""Few-shot fine-tuning: `cellsam-ray finetune` on 8 labelled tiles of a style the bundled model was never
trained on improves it on unseen tiles of that style, and reports its held-back validation split.

The new style is ``envelope`` (``synth.styles``): a nuclear-envelope stain (Lamin-B1), so nuclei show as
bright rims around dim insides, where every nuclear stain the bundled model saw fills the nucleus. It is
left out of the bundled model's training on purpose (``styles.TRAINING_STYLES``). The command runs as a
user runs it, on an OME-Zarr slide with a label image: 8 tiles of one slide, 2 of them held back for the
validation the command reports, with ``finetune``'s defaults. The gain is measured on the windows of
another slide (another seed, never used for tuning). Measured numbers are in ``MEASURED``.
"""

from __future__ import annotations

import json

from cellsam_ray import bundled
from cellsam_ray.cli import main
from cellsam_ray.commands.finetune import DEFAULTS
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.synth.styles import TRAINING_STYLES
from cellsam_ray.train.data import DataSpec, load_images
from cellsam_ray.train.validate import score_tiles

STYLE = "envelope"
GAIN = 0.1
"""F1 the fine-tuned model must gain on unseen tiles of the new style (see MEASURED)."""
MEASURED = "to be measured"


def test_eight_tiles_of_a_new_style_improve_f1_on_unseen_tiles_of_it(tmp_path, capsys):
    assert STYLE not in TRAINING_STYLES
    slides = {}
    for role, seed in (("tune", 41), ("score", 42)):
        slides[role] = str(tmp_path / f"{role}.ome.zarr")
        write_synthetic_slide(slides[role], size=(768, 768), seed=seed, chunk=256, style=STYLE)
    scored = load_images(DataSpec(slides=[slides["score"]], nuclear=["Lamin-B1"]), 256)
    before = score_tiles(load_cellsam(str(bundled.WEIGHTS), str(bundled.CONFIG)), scored)

    out = tmp_path / "tuned"
    assert main(["finetune", str(out), "--slide", slides["tune"], "--nuclear", "Lamin-B1", "--max-tiles", "8"]) == 0
    printed = capsys.readouterr().out
    assert "starting from the bundled demo model" in printed and "validation before" in printed
    report = json.loads((out / "validation.json").read_text())
    assert report["tiles"] == DEFAULTS["validation_tiles"] == 2
    assert report["after"]["f1"] > report["before"]["f1"]

    after = score_tiles(load_cellsam(str(out / "cellsam.pt"), str(out / "config.json")), scored)
    assert after.f1 >= before.f1 + GAIN, (before, after)
