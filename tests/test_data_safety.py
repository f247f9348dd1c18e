"""Nothing lost, nothing mixed: overwrite, work prefixes, one writer per label, completion, resume, on real
runs (a local Ray cluster, the real S3 server). Every test checks that the input slide's bytes are unchanged.

Faults are real: a run's lease file removed under it (the run must find out before it writes, as when
another run has taken the label over), a driver SIGKILLed, a tile that fails on every attempt, a
checkpoint replaced under the same URL. ``cellsam_ray.testing.faults:FaultySegmenter`` holds a chosen tile until
the test releases it, so each fault lands at a known point of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from cellsam_ray.cli import main
from cellsam_ray.driver.api import segment
from cellsam_ray.driver.windows import plan_run
from cellsam_ray.errors import RunFailed, UserError
from cellsam_ray.io.ngff import open_image
from cellsam_ray.io.storage import open_group
from cellsam_ray.model import bundled
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import array_checksums, file_checksums, same_up_to_relabelling, validate_ome_zarr
from cellsam_ray.testing.s3 import spec_storage
from cellsam_ray.tiling import plan_grid

ROOT = Path(__file__).resolve().parents[1]
FAULTY = "cellsam_ray.testing.faults:FaultySegmenter"
SIZE = (512, 512)
TILING = dict(tile=128, halo=32, band=8, chunk=64)  # 16 tiles
SPEC = dict(nuclear=["DAPI"], segmenter=FAULTY, tissue_mask=False, batch_size=2, workers=1, qc_images=False,
            lease_timeout_s=5, **TILING)
LAST = plan_grid(*SIZE, **TILING).tile_at(3, 3).origin


def faulty(slide: str, folder: Path, **faults) -> dict:
    """The spec fields of a FaultySegmenter answering ``slide``'s ground truth, leaving its files in
    ``folder``, with ``faults``."""
    return dict(SPEC, segmenter_options=dict(labels=slide, folder=str(folder), **faults))


def faulty_args(slide: str, folder: Path) -> list[str]:
    """``faulty`` on the command line, without faults."""
    return ["--segmenter", FAULTY, "--segmenter-option", f"labels={slide}", "--segmenter-option", f"folder={folder}"]


def hold_last_tile(slide: str, folder: Path) -> dict:
    """The spec fields of a run that holds its last tile until ``folder/release`` exists (and, once it does,
    of the same run again: the options are part of what a resume must match)."""
    return faulty(slide, folder, hold_at="{},{}".format(*LAST))


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def held(folder: Path) -> bool:
    return (folder / "held").is_dir() and any((folder / "held").iterdir())


def driver_holding_last_tile(slide: str, label: str, ray_cluster, folder: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A job driver (``jobs/segment.py``, its own process, joined to the test's cluster) writing
    ``labels/<label>``, once its last tile is held on the model; with its spec file and the hold's folder."""
    spec, calls = folder / "spec.json", folder / "hold"
    spec.write_text(json.dumps(dict(input=slide, label_name=label, **hold_last_tile(slide, calls))))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "segment.py"), str(spec), "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: held(calls), "the last tile to be held")
    return driver, spec, calls


def in_thread(spec: dict) -> tuple[threading.Thread, dict]:
    """``segment(spec)`` in a thread of this process (the driver joins the test's cluster); what it
    returned or raised lands in the dict."""
    out: dict = {}

    def run() -> None:
        try:
            out["report"] = segment(spec, progress=False)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.fixture
def slide(tmp_path):
    url = str(tmp_path / "slide.ome.zarr")
    write_synthetic_slide(url, size=SIZE, channels=2, ngff="0.5", seed=31, chunk=128)
    return url


def truth(url: str) -> np.ndarray:
    return np.asarray(open_image(url).label("ground_truth").array(0)[:])


def test_overwrite_keeps_the_old_labels_until_the_new_run_has_segmented_then_resumes_and_replaces(
        slide, ray_cluster, tmp_path):
    before = array_checksums(slide)
    first = segment(dict(input=slide, label_name="cells", **faulty(slide, tmp_path / "calls")), progress=False)
    old = Path(slide, "labels", "cells")
    old_files = file_checksums(old)
    assert {"cells.parquet", "cells.geojson", "cells.geoparquet", "report.json"} <= set(old_files)

    # The overwrite run segments every tile; then, before anything of the old result is touched, it finds
    # its lease gone (removed under it, as another run's take-over would): it must write nothing more.
    calls = tmp_path / "hold"
    held_spec = dict(input=slide, label_name="cells", overwrite=True, **{**hold_last_tile(slide, calls), "chunk": 32})
    thread, out = in_thread(held_spec)
    wait_for(lambda: held(calls), "the last tile to be held")
    Path(slide, "labels", "cells.lease.json").unlink()
    (calls / "release").touch()
    thread.join(300)
    assert isinstance(out.get("error"), RunFailed) and "lost its lease" in str(out["error"])

    assert file_checksums(old, skip="work") == old_files  # the old result, byte for byte: arrays, report, table, outlines
    assert open_image(slide).label("cells").levels[0].chunks == (64, 64)  # still listed and complete
    failed = json.loads((old / "work" / "report.json").read_text())  # the new run's report, beside its work
    assert failed["status"] == "failed" and "lost its lease" in failed["error"]
    assert len(list((old / "work" / "candidates").glob("*.done"))) == 16

    # The same overwrite spec again resumes its own unfinished run (nothing segmented twice), then replaces.
    report = segment(held_spec, progress=False)  # released: the hold no longer holds
    assert report["summary"]["tiles_resumed"] == 16 and report["summary"]["tiles_segmented"] == 0
    assert report["run_id"] not in (first["run_id"], failed["run_id"])
    labels = open_image(slide).label("cells")
    assert labels.levels[0].chunks == (32, 32)  # the new label image
    assert same_up_to_relabelling(np.asarray(labels.array(0)[:]), truth(slide))
    assert json.loads((old / "report.json").read_text())["run_id"] == report["run_id"]
    assert not (old / "work").exists() and not Path(slide, "labels", "cells.lease.json").exists()
    validate_ome_zarr(slide)
    assert array_checksums(slide) == before


@pytest.mark.parametrize("where", ["slide", "parent", "inside"])
def test_a_work_dir_that_is_or_holds_the_slide_is_refused_and_nothing_is_deleted(slide, tmp_path, capsys, where):
    parent = Path(slide).parent
    (parent / "notes.txt").write_text("a user's file beside the slide")
    work_dir = {"slide": slide, "parent": str(parent), "inside": str(Path(slide, "scratch"))}[where]
    before = file_checksums(parent, skip="calls")
    argv = ["segment", slide, "--nuclear", "DAPI", *faulty_args(slide, tmp_path / "calls"), "--work-dir", work_dir,
            "--no-progress", *[f"--{k}={v}" for k, v in TILING.items()]]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and ("is or holds the input slide" in error[0] or "lies inside the input slide" in error[0])
    assert file_checksums(parent, skip="calls") == before


def test_two_slides_cannot_share_a_work_dir(slide, ray_cluster, tmp_path, capsys):
    other = str(tmp_path / "other.ome.zarr")
    write_synthetic_slide(other, size=SIZE, channels=2, ngff="0.5", seed=32, chunk=128)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "unrelated.txt").write_text("kept")
    # Slide A's run fails on one tile: its finished tiles stay in the shared scratch folder.
    fail_at = "{},{}".format(*plan_grid(*SIZE, **TILING).tile_at(1, 1).origin)
    failing = dict(input=slide, work_dir=str(scratch), **faulty(slide, tmp_path / "calls", fail_at=fail_at))
    with pytest.raises(RunFailed, match="1 tile\\(s\\) failed"):
        segment(failing, progress=False)
    kept = file_checksums(scratch)
    assert len([k for k in kept if k.endswith(".done")]) == 15

    before = array_checksums(other)
    argv = ["segment", other, "--nuclear", "DAPI", *faulty_args(other, tmp_path / "calls"), "--work-dir", str(scratch),
            "--no-progress", "--no-tissue-mask", *[f"--{k}={v}" for k, v in TILING.items()]]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"belongs to the unfinished run of {slide} labels/cells" in error
    assert file_checksums(scratch) == kept and array_checksums(other) == before
    assert "cells" not in open_image(other).label_names

    # Slide A resumes from it; once done, its files are gone and the user's file is not.
    (tmp_path / "calls" / "mended").touch()  # the cause gone, the same spec
    report = segment(failing, progress=False)
    assert report["summary"]["tiles_resumed"] == 15
    assert file_checksums(scratch) == {"unrelated.txt": hashlib.sha256(b"kept").hexdigest()}


def test_a_second_run_on_a_label_is_refused_while_the_first_finishes(slide, ray_cluster, tmp_path, capsys):
    before = array_checksums(slide)
    calls = tmp_path / "hold"
    thread, out = in_thread(dict(input=slide, **hold_last_tile(slide, calls)))
    wait_for(lambda: held(calls), "the last tile to be held")
    first_id = json.loads(Path(slide, "labels", "cells", "report.json").read_text())["run_id"]

    argv = ["segment", slide, "--nuclear", "DAPI", *faulty_args(slide, tmp_path / "calls"), "--overwrite",
            "--no-progress", *[f"--{k}={v}" for k, v in TILING.items()]]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"labels/cells of {slide} is being written by run {first_id}" in error

    (calls / "release").touch()
    thread.join(300)
    assert "error" not in out, out.get("error")
    assert out["report"]["status"] == "succeeded" and out["report"]["run_id"] == first_id
    assert same_up_to_relabelling(np.asarray(open_image(slide).label("cells").array(0)[:]), truth(slide))
    assert array_checksums(slide) == before


def test_a_killed_run_leaves_its_report_running_and_no_reader_takes_its_label_for_complete(
        slide, ray_cluster, tmp_path, capsys):
    before = array_checksums(slide)
    driver, spec, calls = driver_holding_last_tile(slide, "killed", ray_cluster, tmp_path)
    driver.send_signal(signal.SIGKILL)
    driver.communicate()

    report = json.loads(Path(slide, "labels", "killed", "report.json").read_text())
    assert report["status"] == "running"
    assert "killed" not in open_image(slide).label_names
    with pytest.raises(UserError, match="labels/killed .* is incomplete"):
        open_image(slide).label("killed")
    assert main(["evaluate", f"{slide}#labels/killed", f"{slide}#labels/ground_truth"]) == 2
    assert "is incomplete" in capsys.readouterr().err

    # Its lease names a process that is gone from this host: the same spec takes it and resumes at once.
    (calls / "release").touch()
    assert main(["run", str(spec), "--no-progress"]) == 0
    report = json.loads(Path(slide, "labels", "killed", "report.json").read_text())
    assert report["status"] == "succeeded" and report["summary"]["tiles_resumed"] >= 14
    assert main(["evaluate", f"{slide}#labels/killed", f"{slide}#labels/ground_truth"]) == 0
    assert array_checksums(slide) == before


def test_a_stopped_run_says_so_in_one_line_ends_its_report_stopped_and_gives_its_lease_back(
        slide, ray_cluster, tmp_path):
    """SIGTERM (``ray job stop``, a node shutting down) after the driver joined Ray: Ray's own handler would
    end the process at once (exit 1, the report left running); the run takes the signal back and stops as
    Ctrl-C would."""
    before = array_checksums(slide)
    driver, spec, calls = driver_holding_last_tile(slide, "sigterm", ray_cluster, tmp_path)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)

    assert driver.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("cellsam-ray: stopped; the finished tiles are kept"), err
    report = json.loads(Path(slide, "labels", "sigterm", "report.json").read_text())
    assert report["status"] == "stopped" and "sigterm" not in open_image(slide).label_names

    (calls / "release").touch()
    assert main(["run", str(spec), "--no-progress"]) == 0  # its lease was given back: taken at once
    report = json.loads(Path(slide, "labels", "sigterm", "report.json").read_text())
    assert report["status"] == "succeeded" and report["summary"]["tiles_resumed"] >= 14
    assert array_checksums(slide) == before


def test_a_checkpoint_changed_under_the_same_url_is_not_resumed_into_the_old_tiles(
        s3_prefix, storage_options, ray_cluster, tmp_path):
    slide, weights = f"{s3_prefix}/slide.ome.zarr", f"{s3_prefix}/models/cellsam.pt"
    write_synthetic_slide(slide, size=(384, 384), channels=2, ngff="0.5", seed=33, chunk=64,
                          storage_options=storage_options)
    fs = fsspec.filesystem("s3", **storage_options)
    fs.put_file(str(bundled.WEIGHTS), weights.removeprefix("s3://"))
    before = array_checksums(slide, storage_options)
    spec = dict(input=slide, nuclear=["DAPI"], whole_cell=["E-cadherin"], weights=weights, config=str(bundled.CONFIG),
                tile=192, halo=32, chunk=64, tissue_mask=False, cell_table=False, qc_images=False, lease_timeout_s=5,
                **spec_storage(storage_options))
    lease = f"{s3_prefix}/slide.ome.zarr/labels/cells.lease.json".removeprefix("s3://")

    # The first run segments its tiles and fails before writing (its lease removed under it).
    thread, out = in_thread(spec)
    wait_for(lambda: fs.exists(lease), "the lease")
    fs.rm_file(lease)
    thread.join(300)
    assert isinstance(out.get("error"), RunFailed) and "lost its lease" in str(out["error"])
    old_sha = hashlib.sha256(bundled.WEIGHTS.read_bytes()).hexdigest()

    # The checkpoint is replaced by another one under the same URL.
    state = torch.load(bundled.WEIGHTS, weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 0.01
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    fs.put_file(str(changed), weights.removeprefix("s3://"))

    with pytest.raises(UserError, match="has an unfinished run that differs from this one in weights_sha256"):
        segment(spec, progress=False)
    report = segment({**spec, "overwrite": True}, progress=False)
    assert report["summary"]["tiles_resumed"] == 0 and report["summary"]["tiles_segmented"] == 4
    assert report["model"]["weights_sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest() != old_sha
    assert array_checksums(slide, storage_options) == before


def test_a_changed_segmenter_option_is_not_resumed_into_the_old_tiles(slide, ray_cluster, tmp_path):
    """A segmenter's options decide its tiles as weights do: a run whose options differ is told so, and
    with overwrite starts afresh instead of mixing its tiles with the old run's."""
    before = array_checksums(slide)
    fail_at = "{},{}".format(*plan_grid(*SIZE, **TILING).tile_at(2, 2).origin)
    first = dict(input=slide, **faulty(slide, tmp_path / "calls", fail_at=fail_at))
    with pytest.raises(RunFailed, match="1 tile\\(s\\) failed"):
        segment(first, progress=False)
    assert len(list(Path(slide, "labels", "cells", "work", "candidates").glob("*.done"))) == 15

    changed = dict(input=slide, **faulty(slide, tmp_path / "calls"))  # no failing tile: another option set
    with pytest.raises(UserError, match="has an unfinished run that differs from this one in segmenter_options:"):
        segment(changed, progress=False)
    report = segment({**changed, "overwrite": True}, progress=False)
    assert report["status"] == "succeeded"
    assert report["summary"]["tiles_resumed"] == 0 and report["summary"]["tiles_segmented"] == 16
    assert report["spec"]["segmenter_options"] == dict(labels=slide, folder=str(tmp_path / "calls"))
    assert array_checksums(slide) == before


@pytest.mark.parametrize("listing", ["ground_truth", ["ground_truth", 7]])
def test_a_malformed_labels_list_is_refused_and_left_unchanged(slide, tmp_path, capsys, listing):
    group = open_group(slide, mode="r+")["labels"]
    group.attrs["ome"] = {**dict(group.attrs["ome"]), "labels": listing}
    metadata = Path(slide, "labels", "zarr.json")
    text, before = metadata.read_bytes(), array_checksums(slide)
    argv = ["segment", slide, "--nuclear", "DAPI", *faulty_args(slide, tmp_path / "calls"), "--no-progress",
            *[f"--{k}={v}" for k, v in TILING.items()]]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "malformed 'labels' list" in error[0]
    assert metadata.read_bytes() == text and array_checksums(slide) == before
    assert not Path(slide, "labels", "cells").exists()


def test_credentials_never_travel_in_a_plan(s3_prefix, storage_options, monkeypatch, tmp_path):
    slide = f"{s3_prefix}/slide.ome.zarr"
    write_synthetic_slide(slide, size=(128, 128), channels=2, ngff="0.5", seed=34, chunk=64,
                          storage_options=storage_options)
    secret = "s3cr3t-" + os.urandom(6).hex()
    monkeypatch.setenv("CELLSAM_TEST_SLIDE_SECRET", secret)
    spec = SegmentSpec(input=slide, nuclear=["DAPI"], segmenter=FAULTY, tile=64, halo=16, chunk=64, band=8,
                       segmenter_options=dict(labels=slide, folder=str(tmp_path / "calls")),
                       storage_options={"endpoint_url": storage_options["endpoint_url"]},
                       storage_options_env={"key": "AWS_ACCESS_KEY_ID", "secret": "CELLSAM_TEST_SLIDE_SECRET"})
    plan = plan_run(spec)  # reads the slide with the secret, resolved here
    assert plan.spec.storage.options()["secret"] == secret
    assert secret.encode() not in pickle.dumps(plan)
