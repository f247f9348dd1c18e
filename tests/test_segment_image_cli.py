"""``cellsam-ray segment-image``: golden images in three formats, and every bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import cellsam_ray.model.weights
from cellsam_ray.cli import main
from cellsam_ray.testing.checks import reference_dir

REFERENCE = reference_dir()
GOLDEN = REFERENCE / "golden"
CASES = json.loads((GOLDEN / "cases.json").read_text())


def tiny_args(tmp_path: Path, input_path: Path, output_name: str, normalize: bool, *mode: str) -> list[str]:
    """``mode``: nothing (the default mode) or ``"--mode", NAME``."""
    return [
        "segment-image", str(input_path), str(tmp_path / output_name),
        "--weights", str(GOLDEN / "tiny_cellsam.pt"), "--config", str(GOLDEN / "tiny_config.json"),
        "--normalize" if normalize else "--no-normalize", *mode,
    ]


@pytest.mark.parametrize(
    ("case", "suffix", "output_name"),
    [("rgb3_256_nonorm", ".npy", "labels.tif"), ("two_channel_300x200_norm", ".tif", "labels.npy"),
     ("gray_512_norm", ".png", "labels.tiff")],
)
def test_golden_image_in_each_format(tmp_path, capsys, case, suffix, output_name):
    image = np.load(GOLDEN / f"{case}.input.npy")
    input_path = tmp_path / f"in{suffix}"
    if suffix == ".npy":
        np.save(input_path, image)
    elif suffix == ".tif":
        tifffile.imwrite(input_path, image)
    else:
        Image.fromarray(image).save(input_path)
    assert main(tiny_args(tmp_path, input_path, output_name, CASES[case]["normalize"])) == 0
    out = tmp_path / output_name
    labels = np.load(out) if out.suffix == ".npy" else tifffile.imread(out)
    expected = np.load(GOLDEN / f"{case}.expected.npz")["labels"]
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)
    assert capsys.readouterr().out.strip() == f"{expected.max()} cells -> {out}"


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif path.suffix == ".npy":
        np.save(path, content)
    elif path.suffix == ".png":
        Image.fromarray(content).save(path)
    else:
        tifffile.imwrite(path, content)
    return path


BAD_INPUTS = {
    "four_channels": ("in.npy", np.ones((16, 16, 4)), "4 channels"),
    "rgba_png": ("in.png", np.ones((16, 16, 4), dtype=np.uint8), "4 channels"),
    "channels_first": ("in.tif", np.ones((2, 16, 16), dtype=np.uint16), "channels last"),
    "nan": ("in.npy", np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or infinite"),
    "inf": ("in.tif", np.array([[1.0, np.inf], [0.0, 1.0]], dtype=np.float32), "NaN or infinite"),
    "one_dim": ("in.npy", np.ones(16), "expected H×W or H×W×C"),
    "four_dim": ("in.npy", np.ones((2, 16, 16, 1)), "expected H×W or H×W×C"),
    "no_pixels": ("in.npy", np.ones((0, 16)), "holds no pixels"),
    "strings": ("in.npy", np.array([["a", "b"]]), "expected numbers"),
    "empty_file": ("in.tif", b"", "empty file"),
    "garbage_tif": ("in.tif", b"not a tiff at all", "not a readable .tif image"),
    "garbage_npy": ("in.npy", b"\x93NUMPY garbage", "not a readable .npy image"),
    "unknown_extension": ("in.jpg", b"\xff\xd8\xff", "unknown extension '.jpg'"),
}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for bad input")

    monkeypatch.setattr(cellsam_ray.model.weights, "load_cellsam", refuse)


def assert_one_line_error(capsys, fragment: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cellsam-ray: error: "), err
    assert fragment in err, err


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, capsys, no_model, name):
    filename, content, fragment = BAD_INPUTS[name]
    path = _write(tmp_path / filename, content)
    assert main(["segment-image", str(path), str(tmp_path / "out.npy"), "--weights", "w.pt"]) == 2
    assert_one_line_error(capsys, fragment)


@pytest.mark.parametrize(
    ("extra", "output", "fragment"),
    [
        ([], "out.png", "unknown extension '.png'"),
        ([], "missing-folder/out.npy", "does not exist"),
        (["--storage-options", "{not json"], "out.npy", "not valid JSON"),
        (["--storage-options", "[1, 2]"], "out.npy", "must be a JSON object"),
    ],
)
def test_bad_options_are_one_line_before_the_model_loads(tmp_path, capsys, no_model, extra, output, fragment):
    path = _write(tmp_path / "in.npy", np.ones((16, 16)))
    assert main(["segment-image", str(path), str(tmp_path / output), "--weights", "w.pt", *extra]) == 2
    assert_one_line_error(capsys, fragment)


def test_missing_input_and_missing_weights(tmp_path, capsys):
    assert main(["segment-image", str(tmp_path / "nope.npy"), str(tmp_path / "o.npy"), "--weights", "w.pt"]) == 2
    assert_one_line_error(capsys, "not found")
    path = _write(tmp_path / "in.npy", np.ones((16, 16)))
    assert main(["segment-image", str(path), str(tmp_path / "o.npy"), "--weights", str(tmp_path / "w.pt")]) == 2
    assert_one_line_error(capsys, "not found")


def test_reference_mode_gives_the_golden_labels_too(tmp_path, capsys):
    case = "two_channel_300x200_norm"
    np.save(tmp_path / "in.npy", np.load(GOLDEN / f"{case}.input.npy"))
    argv = tiny_args(tmp_path, tmp_path / "in.npy", "labels.npy", CASES[case]["normalize"], "--mode", "reference")
    assert main(argv) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), np.load(GOLDEN / f"{case}.expected.npz")["labels"])


def test_an_unknown_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["segment-image", "in.npy", "out.npy", "--weights", "w.pt", "--mode", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


def test_input_output_and_weights_in_object_storage(tmp_path, capsys, monkeypatch, storage_options, s3_prefix):
    import fsspec

    monkeypatch.setenv("HOME", str(tmp_path))  # the weights cache lives under ~/.cache
    case = "rgb3_256_nonorm"
    fs = fsspec.filesystem("s3", **storage_options)
    fs.put(str(GOLDEN / f"{case}.input.npy"), f"{s3_prefix}/in.npy")
    fs.put(str(GOLDEN / "tiny_cellsam.pt"), f"{s3_prefix}/tiny.pt")
    argv = [
        "segment-image", f"{s3_prefix}/in.npy", f"{s3_prefix}/labels.npy",
        "--weights", f"{s3_prefix}/tiny.pt", "--config", str(GOLDEN / "tiny_config.json"), "--no-normalize",
        "--storage-options", json.dumps({"endpoint_url": storage_options["endpoint_url"]}),  # keys: environment
    ]
    assert main(argv) == 0
    with fs.open(f"{s3_prefix}/labels.npy", "rb") as f:
        labels = np.load(f)
    np.testing.assert_array_equal(labels, np.load(GOLDEN / f"{case}.expected.npz")["labels"])
    assert main(argv) == 2  # the output exists now: replaced only when asked
    assert capsys.readouterr().err.strip().endswith("labels.npy already exists: pass --overwrite to replace it")
    assert main([*argv, "--overwrite"]) == 0
