"""Bad input is refused before any model runs: one line naming the problem, a non-zero exit, and the
image untouched.

Every case goes through ``cellsam_ray.cli.main`` as a user's command would. Ray is never started: the
test makes starting it an error, so a check that slipped past planning would fail here, not after an hour
of GPU time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cellsam_ray.cli import build_parser, main
from cellsam_ray.commands.segment import spec_from_args
from cellsam_ray.io.ngff import Axis, Channel, create_image, image_axes
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import array_checksums
from cellsam_ray.testing.ecosystem import disc_cells, fluorescence, write_with_ome_zarr_py

# The oracle is never built here (no Ray): its labels only need naming, as planning checks that its options fit.
ORACLE = ["--segmenter", "cellsam_ray.testing.oracle:GroundTruthSegmenter", "--segmenter-option", "labels=truth.npy"]
SMALL = ["--tile", "128", "--halo", "32", "--chunk", "64"]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse() -> None:
        raise AssertionError("bad input reached Ray: it must be refused while planning")

    monkeypatch.setattr("cellsam_ray.driver.api.ensure_ray", refuse)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("bad") / "slide.ome.zarr")
    write_synthetic_slide(url, size=(256, 256), channels=3, ngff="0.5", seed=2, chunk=128)
    return url


def refused(argv: list[str], capsys) -> str:
    """The one-line error of a refused command (asserting it was refused, in one line)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cellsam-ray: error: "), err
    return err.strip()


def image_with(tmp_path, axes, shape, dtype="uint16", channels=1) -> str:
    url = str(tmp_path / "odd.ome.zarr")
    image = create_image(url, shape=shape, dtype=dtype, chunks=shape, axes=axes, scale=[1.0] * len(shape),
                         levels=1, channels=[Channel(f"ch{i}") for i in range(channels)])
    image.array(0)[:] = np.ones(shape, dtype=dtype)
    return url


@pytest.mark.parametrize("argv, message", [
    (["--nuclear", "DAPl"], "nuclear channel 'DAPl' is not in the image; available: DAPI, E-cadherin, Pan-Cytokeratin"),
    (["--nuclear", "DAPI", "--whole-cell", "CD45"], "whole-cell channel 'CD45' is not in the image; available: DAPI"),
    (["--nuclear", "7"], "nuclear channel '7' is not in the image"),
    (["--nuclear", "DAPI", "--level", "5"], "--level 5 does not exist: the image has levels 0..0"),
    (["--nuclear", "DAPI", "--label-name", "ground_truth"], "labels/ground_truth already exists"),
    (["--nuclear", "DAPI", "--tile", "100"], "--tile 100 must be a positive multiple of the label chunk size 64"),
    (["--nuclear", "DAPI", "--halo", "60"], "--tile 128 is too small for --halo 60"),
    (["--nuclear", "DAPI", "--segmenter", "no_such_module:Model"], "cannot import 'no_such_module'"),
    (["--nuclear", "DAPI", "--segmenter", "cellsam_ray.testing.oracle:NoSuchClass"], "has no attribute 'NoSuchClass'"),
    (["--nuclear", "DAPI", "--storage-options-env", '{"secret": "CELLSAM_TEST_UNSET"}'],
     "storage_options_env.secret names the environment variable CELLSAM_TEST_UNSET, which is not set here"),
    (["--nuclear", "DAPI", "--segmenter-option", "level"], "--segmenter-option 'level' must look like KEY=VALUE"),
    (["--nuclear", "DAPI", "--segmenter-option", "level=[1, 2]"],
     "--segmenter-option: option level is list: an option is a string, a number, true, false or null"),
    (["--nuclear", "DAPI", "--segmenter-option", "token=abc"], "--segmenter-option: option token holds a secret"),
    (["--nuclear", "DAPI", "--segmenter", "cellsam_ray.testing.faults:FaultySegmenter"],
     "--segmenter cellsam_ray.testing.faults:FaultySegmenter: its options do not fit it: missing a required argument: "
     "'folder' (it takes: labels, folder, crash_at, fail_at, oom_above, delay, hold_at, barrier)"),
])
def test_a_wrong_option_is_one_line_before_any_model(slide, capsys, argv, message):
    before = array_checksums(slide)
    assert message in refused(["segment", slide, *SMALL, *ORACLE, *argv], capsys)  # the last of a repeated option wins
    assert array_checksums(slide) == before


def test_an_option_the_segmenter_does_not_take_is_one_line_from_the_command(slide):
    """Found while planning, before Ray starts: in a subprocess, as a user meets it (no traceback)."""
    done = subprocess.run([sys.executable, "-m", "cellsam_ray.cli", "segment", slide, "--nuclear", "DAPI", *SMALL,
                           *ORACLE, "--segmenter-option", "lables=truth.npy", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("cellsam-ray: error: --segmenter cellsam_ray.testing.oracle:GroundTruthSegmenter: "
                                  "its options do not fit it: got an unexpected keyword argument 'lables'")


def test_segmenter_options_without_a_segmenter_are_refused(slide, capsys):
    message = refused(["segment", slide, "--nuclear", "DAPI", *SMALL, "--segmenter-option", "level=1"], capsys)
    assert message == ("cellsam-ray: error: --segmenter-option: options are keyword arguments for --segmenter's "
                       "factory: name the segmenter too (--segmenter module:attr)")


def test_a_segmenter_option_is_json_where_it_parses_else_a_string():
    args = build_parser("segment").parse_args([
        "segment", "slide.ome.zarr", "--nuclear", "DAPI", *ORACLE, "--segmenter-option", "level=1",
        "--segmenter-option", "jitter=0.5", "--segmenter-option", "exact=true", "--segmenter-option", "none=null",
        "--segmenter-option", 'name="5"', "--segmenter-option", "at=224,96", "--segmenter-option", "url=s3://b/k=v",
        "--segmenter-option", "empty="])
    assert spec_from_args(args).segmenter_options == dict(labels="truth.npy", level=1, jitter=0.5, exact=True,
                                                          none=None, name="5", at="224,96", url="s3://b/k=v",
                                                          empty="")


def test_missing_or_bad_weights_are_refused_before_any_actor(slide, tmp_path, capsys):
    base = ["segment", slide, "--nuclear", "DAPI", *SMALL]
    assert "checkpoint /no/such/weights.pt not found" in refused([*base, "--weights", "/no/such/weights.pt"], capsys)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"<html>403 Forbidden</html>")
    assert "is not a PyTorch weights file" in refused([*base, "--weights", str(garbage)], capsys)

    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, weights)
    message = refused([*base, "--weights", str(weights), "--weights-sha256", "0" * 64], capsys)
    assert f"checkpoint {weights} has sha256" in message and "expected 000000" in message


class _RunsACommand:
    """Unpickled, this would run a shell command that leaves a marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_weights_that_would_run_code_are_refused_unrun_before_any_actor(slide, tmp_path, capsys):
    marker = tmp_path / "it-ran"
    weights = tmp_path / "trojan.pt"
    torch.save({"w": torch.zeros(3), "payload": _RunsACommand(marker)}, weights)
    base = ["segment", slide, "--nuclear", "DAPI", *SMALL]

    message = refused([*base, "--weights", str(weights)], capsys)  # no_ray: refused before Ray starts

    assert f"checkpoint {weights} holds more than tensors" in message and "system" in message
    assert "nothing in it ran" in message and "weights_only" not in message  # no advice to load it unsafely
    assert not marker.exists()
    other = tmp_path / "other-model.pt"
    torch.save({"w": torch.zeros(3)}, other)
    assert f"checkpoint {other} does not fit this CellSAM config" in refused([*base, "--weights", str(other)], capsys)


def test_what_is_not_an_ome_zarr_image_is_refused(tmp_path, capsys):
    missing = tmp_path / "nowhere.ome.zarr"
    assert f"{missing} does not exist" in refused(["segment", str(missing), "--nuclear", "DAPI", *ORACLE], capsys)

    folder = tmp_path / "photos"
    folder.mkdir()
    assert "no zarr group" in refused(["segment", str(folder), "--nuclear", "DAPI", *ORACLE], capsys)

    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("x", shape=(4, 4), dtype="u1")
    assert "is not an OME-Zarr image" in refused(["segment", str(tmp_path / "plain.zarr"), "--nuclear", "0", *ORACLE],
                                                 capsys)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_label_image_or_labels_group_is_not_taken_for_the_image(tmp_path, capsys, version):
    truth = disc_cells((96, 96), seed=3)
    url = write_with_ome_zarr_py(str(tmp_path / "slide.ome.zarr"), fluorescence(truth, 2, np.uint16, seed=3),
                                 version=version, channel_names=["DAPI", "CD45"], ground_truth=truth)
    before = array_checksums(url)
    for given, what in ((f"{url}/labels/ground_truth", "a label image"), (f"{url}/labels", "the labels group")):
        message = refused(["segment", given, "--nuclear", "0", "--label-name", "x", *SMALL, *ORACLE], capsys)
        assert f"{given} is {what} of {url}, not an image to segment" in message
    assert array_checksums(url) == before
    assert not (tmp_path / "slide.ome.zarr" / "labels" / "ground_truth" / "labels").exists()


@pytest.mark.parametrize("axes, shape, dtype, argv, message", [
    ((*image_axes("cyx"), Axis("w", "space", "micrometer")), (1, 64, 64, 2), "uint16", [],
     "unsupported axes ['c', 'y', 'x', 'w']"),
    (image_axes("cyx"), (1, 64, 64), "bool", [], "unsupported pixel type bool"),
    (image_axes("cyx"), (1, 64, 64), "complex64", [], "unsupported pixel type complex64"),
    (image_axes("czyx"), (1, 3, 64, 64), "uint16", [], "the image has 3 z planes: choose one with --z"),
    (image_axes("czyx"), (1, 3, 64, 64), "uint16", ["--z", "5"], "plane --z 5 does not exist: the image has 3"),
    (image_axes("cyx"), (1, 64, 64), "uint16", ["--z", "2"], "--z 2 does not exist: the image has no z axis (its axes are cyx)"),
    (image_axes("czyx"), (1, 1, 64, 64), "uint16", ["--t", "1"], "--t 1 does not exist: the image has no t axis (its axes are czyx)"),
])
def test_unsupported_images_are_refused(tmp_path, capsys, axes, shape, dtype, argv, message):
    url = image_with(tmp_path, axes, shape, dtype)
    before = array_checksums(url)
    assert message in refused(["segment", url, "--nuclear", "ch0", *SMALL, *ORACLE, *argv], capsys)
    assert array_checksums(url) == before
    assert not (tmp_path / "odd.ome.zarr" / "labels").exists()


def test_missing_credentials_or_bucket_are_refused(s3, storage_options, s3_prefix, monkeypatch, capsys):
    url = f"{s3_prefix}/slide.ome.zarr"
    write_synthetic_slide(url, size=(128, 128), channels=2, chunk=64, storage_options=storage_options)
    before = array_checksums(url, storage_options)
    command = ["segment", url, "--nuclear", "DAPI", *ORACLE]

    assert "bucket 'no-such-bucket' of s3://no-such-bucket/slide.ome.zarr does not exist" in refused(
        ["segment", "s3://no-such-bucket/slide.ome.zarr", "--nuclear", "DAPI", *ORACLE], capsys)
    assert "ProfileNotFound" in refused([*command, "--storage-profile", "no-such-profile"], capsys)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "Unable to locate credentials" in refused(command, capsys)
    assert array_checksums(url, storage_options) == before


def test_bad_job_spec_files_are_one_line(slide, tmp_path, capsys):
    cases = {
        "secret.yaml": ("input: x\nnuclear: [DAPI]\nstorage_options: {client_kwargs: {aws_secret_access_key: abc}}\n",
                        "storage_options.client_kwargs.aws_secret_access_key holds a secret"),
        "typo.yaml": ("input: x\nnuclaer: [DAPI]\n", "job spec {}: nuclear: Field required"),
        "extra.json": (json.dumps({"input": "x", "nuclear": ["DAPI"], "colour": "red"}),
                       "colour: Extra inputs are not permitted"),
        "broken.json": ('{"input": "x",', "is not valid JSON"),
        "list.yaml": ("- input: x\n", "must be a mapping of fields"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        assert message.format(path) in refused(["run", str(path)], capsys)
    assert "not found" in refused(["run", str(tmp_path / "missing.yaml")], capsys)


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback(monkeypatch, capsys):
    from cellsam_ray.commands import synth

    def broken(args):
        raise ZeroDivisionError("something this package did not foresee")

    monkeypatch.setattr(synth, "run", broken)
    assert main(["synth", "out.zarr", "--size", "64", "64"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("cellsam-ray: unexpected error: ZeroDivisionError: something this package did not foresee")
    assert main(["--debug", "synth", "out.zarr", "--size", "64", "64"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
