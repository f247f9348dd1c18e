"""``cellsam-ray train`` on Ray Train and ``finetune`` in-process, on a tiny model; bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellsam_ray.cli import main
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.synth import TissueModel, write_synthetic_slide
from test_train import TINY


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("cli") / "slide.ome.zarr")
    write_synthetic_slide(url, size=(128, 128), channels=3, seed=5, chunk=64)
    return url


def test_train_on_ray_train_then_finetune_on_a_folder(ray_cluster, slide, tiny_config, tmp_path, capsys):
    out = tmp_path / "trained"
    assert main(["train", str(out), "--config", tiny_config, "--slide", slide, "--nuclear", "DAPI",
                 "--whole-cell", "E-cadherin", "--steps", "2", "--log-every", "1", "--batch-size", "1",
                 "--local-attention", "--freeze-anchors", "--match-anchor", "20"]) == 0
    assert "training on 1 Ray Train worker(s)" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()] == [1, 2]
    trained = load_cellsam(str(out / "cellsam.pt"), str(out / "config.json"))
    anchors = trained.cellfinder.decode_head.transformer.position.weight  # 30 queries: a 5 × 6 grid, kept
    assert np.allclose(sorted(set(anchors[:, 0].tolist())), (np.arange(6) + 0.5) / 6)

    # A folder of image + label pairs, two-channel images (nuclear, whole-cell) as segment-image takes.
    folder = tmp_path / "pairs"
    folder.mkdir()
    region = TissueModel((128, 128), seed=6, channels=2).render(0, 64, 0, 64)
    np.save(folder / "a.npy", np.moveaxis(region.image, 0, -1))
    np.save(folder / "a_labels.npy", region.labels.astype(np.int32))
    tuned = tmp_path / "tuned"
    assert main(["finetune", str(tuned), "--init", str(out / "cellsam.pt"), "--folder", str(folder),
                 "--steps", "1", "--in-process"]) == 0
    assert "1 labelled tiles of 64² px" in capsys.readouterr().out  # the config beside the checkpoint
    load_cellsam(str(tuned / "cellsam.pt"), tiny_config)


@pytest.mark.parametrize(("argv", "message"), [
    ([], "give labelled data: slides, a folder or synthetic seeds"),
    (["--slide", "{slide}"], "slides need their nuclear channel(s)"),
    (["--folder", "{tmp}/nowhere"], "is not a folder"),
    (["--slide", "{slide}", "--nuclear", "DAPI", "--freeze", "cellfinder-trunk", "cellfinder-head", "sam-trunk",
      "sam-neck", "prompt-encoder", "mask-decoder"], "every part is frozen: nothing would train"),
    (["--slide", "{slide}", "--nuclear", "DAPI", "--steps", "0"], "--steps: Input should be greater than 0"),
])
def test_bad_training_input_is_one_line(slide, tiny_config, tmp_path, capsys, argv, message):
    argv = [a.format(slide=slide, tmp=tmp_path) for a in argv]
    assert main(["train", str(tmp_path / "out"), "--config", tiny_config, "--in-process", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellsam-ray: error: ") and message in err and err.count("\n") == 1
