"""``cellsam-ray evaluate``: label files and OME-Zarr label images, text and JSON, and bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from cellsam_ray.cli import main
from cellsam_ray.evaluate import score_arrays
from cellsam_ray.io import ngff
from cellsam_ray.synth import write_synthetic_slide


def _labels() -> tuple[np.ndarray, np.ndarray]:
    """Three true cells; the prediction matches one (IoU 0.8), half-covers one, invents one."""
    true = np.zeros((30, 30), np.int32)
    true[0:10, 0:10], true[15:25, 15:25], true[0:4, 20:24] = 1, 2, 3
    pred = np.zeros_like(true)
    pred[0:10, 0:8], pred[15:25, 15:19], pred[26:30, 0:4] = 5, 6, 9
    return pred, true


def test_files_text_and_json(tmp_path, capsys):
    pred, true = _labels()
    np.save(tmp_path / "pred.npy", pred)
    tifffile.imwrite(tmp_path / "true.tif", true.astype(np.uint16))
    assert main(["evaluate", str(tmp_path / "pred.npy"), str(tmp_path / "true.tif")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("F1@0.5 0.3333  precision 0.3333  recall 0.3333  mean IoU 0.8000")
    assert "(1 matched, 3 predicted, 3 true cells)" in text
    assert main(["evaluate", str(tmp_path / "pred.npy"), str(tmp_path / "true.tif"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["f1"] == pytest.approx(1 / 3) and result["mean_iou"] == pytest.approx(0.8)
    assert (result["true_positives"], result["predicted"], result["true"], result["threshold"]) == (1, 3, 3, 0.5)
    # A stricter threshold drops the IoU-0.8 match.
    assert main(["evaluate", str(tmp_path / "pred.npy"), str(tmp_path / "true.tif"), "--json",
                 "--threshold", "0.85"]) == 0
    assert json.loads(capsys.readouterr().out)["true_positives"] == 0


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A small synthetic slide with labels/ground_truth and labels/cells (ground truth, one cell erased)."""
    url = str(tmp_path_factory.mktemp("eval") / "slide.ome.zarr")
    write_synthetic_slide(url, size=(200, 160), channels=2, seed=4, chunk=64)
    image = ngff.open_image(url, mode="r+")
    true = np.asarray(image.label("ground_truth").array(0))
    pred = true.copy()
    pred[pred == np.unique(true)[1]] = 0
    ngff.create_labels(image, "cells", chunks=(64, 64), run_id="test").array(0)[:] = pred
    ngff.publish_label(image, "cells")
    return url, score_arrays(pred, true)


def test_ome_zarr_label_images_named_three_ways(slide, capsys):
    url, expected = slide
    for argv in ([f"{url}#labels/cells", f"{url}#labels/ground_truth"],
                 [url, "--pred-label", "cells", "--gt-label", "ground_truth"],
                 [f"{url}/labels/cells", url, "--gt-label", "ground_truth"]):
        assert main(["evaluate", *argv, "--json"]) == 0, argv
        result = json.loads(capsys.readouterr().out)
        assert result["true_positives"] == expected.true_positives == expected.true - 1
        assert result["f1"] == pytest.approx(expected.f1) and result["f1"] < 1


@pytest.mark.parametrize(("argv", "message"), [
    (["{url}"], "give GT, or one slide URL with both --pred-label and --gt-label"),
    (["{url}", "{url}#labels/ground_truth"], "is an image, not labels: name one with #labels/NAME or --pred-label "
                                               "NAME (it has: ground_truth, cells)"),
    (["{url}#labels/nope", "{url}#labels/ground_truth"], "has no label image 'nope'"),
    (["{url}#cells", "{url}#labels/ground_truth"], "the part after '#' must be labels/NAME"),
    (["{tmp}/pred.npy", "{url}#labels/ground_truth"], "PRED has shape (30, 30) but GT has (200, 160)"),
    (["{tmp}/float.npy", "{tmp}/pred.npy"], "has dtype float64; label images hold integers"),
    (["{tmp}/missing.npy", "{tmp}/pred.npy"], "missing.npy not found"),
    (["{tmp}/pred.npy", "{tmp}/pred.npy", "--threshold", "0.3"], "--threshold must lie in [0.5, 1)"),
])
def test_bad_input_is_one_line(slide, tmp_path, capsys, argv, message):
    url, _ = slide
    np.save(tmp_path / "pred.npy", _labels()[0])
    np.save(tmp_path / "float.npy", np.zeros((30, 30)))
    argv = [a.format(url=url, tmp=tmp_path) for a in argv]
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellsam-ray: error: ") and message in err and err.count("\n") == 1
