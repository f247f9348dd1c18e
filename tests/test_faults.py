"""Fault tolerance and resume, with real faults: a model actor's process dies, a worker node is lost, a
driver is SIGKILLed, a tile fails on every attempt, CUDA runs out of memory. Each run's label image must be
byte-identical to a clean run's, and tiles finished before a fault must not be segmented again.

The segmenter is ``cellsam_ray.testing.faults:FaultySegmenter`` (the ground-truth oracle plus injected faults and
a file per window segmented, configured by its ``segmenter_options``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from cellsam_ray.cli import main
from cellsam_ray.driver import model_pool
from cellsam_ray.driver.api import segment
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import array_checksums, label_chunk_files
from cellsam_ray.testing.cluster import RayNodes
from cellsam_ray.testing.faults import window_calls
from cellsam_ray.tiling import plan_grid

ROOT = Path(__file__).resolve().parents[1]
FAULTY = "cellsam_ray.testing.faults:FaultySegmenter"
# A 4×4 grid of 16 tiles; no tissue mask, so every tile is segmented; batches of 4.
SIZE = (512, 512)
TILING = dict(tile=128, halo=32, band=8, chunk=64)
SPEC = dict(nuclear=["DAPI"], segmenter=FAULTY, tissue_mask=False, batch_size=4, workers=1,
            qc_images=False, **TILING)  # the cell table and outlines on: a faulty run must reproduce them too
GRID = plan_grid(*SIZE, **TILING)


def origin(row: int, col: int) -> tuple[int, int]:
    return GRID.tile_at(row, col).origin


def origin_option(row: int, col: int) -> str:
    return "{},{}".format(*origin(row, col))


def faulty(slide: str, folder: Path, **faults) -> dict:
    """The spec fields of a FaultySegmenter run: the oracle answering ``slide``'s ground truth, its files in
    ``folder``, and ``faults``."""
    return dict(SPEC, segmenter_options=dict(labels=slide, folder=str(folder), **faults))


def calls_since(folder: Path, before: list) -> Counter:
    """The windows segmented since ``before`` (an earlier ``window_calls``): the options, and so the folder,
    stay the same when a run is resumed."""
    return Counter(window_calls(folder)) - Counter(before)


def assert_same_labels(slide: str, name: str, reference: str = "clean") -> None:
    files, expected = label_chunk_files(slide, name), label_chunk_files(slide, reference)
    assert sorted(files) == sorted(expected) and len(files) > 10
    different = [path for path in files if files[path] != expected[path]]
    assert not different, f"labels/{name} differs from labels/{reference} in {different[:5]}"
    for outlines in ("cells.geojson", "cells.geoparquet"):  # the cells' outlines too, byte for byte
        ours, theirs = (Path(slide, "labels", label, outlines).read_bytes() for label in (name, reference))
        assert ours == theirs and len(ours) > 1000, f"labels/{name}/{outlines} differs from labels/{reference}'s"


def done_tiles(slide: str, name: str) -> set[str]:
    return {p.name.removesuffix(".done") for p in Path(slide, "labels", name, "work", "candidates").glob("*.done")}


@pytest.fixture(scope="module")
def slide(tmp_path_factory, ray_cluster):
    """A slide and a clean run of the same spec, labels/clean, that every faulty run must reproduce."""
    folder = tmp_path_factory.mktemp("faults")
    url = str(folder / "slide.ome.zarr")
    write_synthetic_slide(url, size=SIZE, channels=2, ngff="0.5", seed=21, chunk=128)
    report = segment(dict(input=url, label_name="clean", **faulty(url, folder / "clean-calls")), progress=False)
    assert report["summary"]["tiles_segmented"] == len(GRID) == 16
    assert Counter(window_calls(folder / "clean-calls")) == {t.origin: 1 for t in GRID.tiles()}
    return url


@pytest.fixture
def faults(slide, tmp_path):
    """The folder of one test: its runs' files are in ``run1``."""
    return tmp_path


def test_a_call_of_several_batches_persists_each_batch_as_it_is_done(slide, faults, monkeypatch):
    """With quick batches and a long queue an actor call carries several batches (the driver's cost is per
    call); each batch's candidates are written as soon as it is done, so a batch, not a call, is what a
    crash loses and a rerun redoes. Here one-tile batches, any batch counted quick and the queue long from
    one batch per actor: the first two calls take a tile each (no batch time known yet), the third the next
    eight, (0, 2) to (2, 1). With (1, 0) held on the model, the two before it are done and none after it."""
    monkeypatch.setattr(model_pool, "QUEUE_PER_ACTOR", 1)  # the driver is this process
    monkeypatch.setattr(model_pool, "CALL_SECONDS", 1e6)
    spec = dict(input=slide, label_name="calls", **dict(faulty(slide, faults / "run1", hold_at=origin_option(1, 0)),
                                                        batch_size=1))
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(report=segment(spec, progress=False)))
    run.start()
    held = faults / "run1" / "held"
    deadline = time.monotonic() + 180
    try:
        while not any(held.glob("*")):
            assert run.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.2)
        time.sleep(1)  # what else would be written meanwhile, would be by now
        done_while_held = done_tiles(slide, "calls")
    finally:
        (faults / "run1" / "release").touch()
        run.join(timeout=300)
    third_call = [t.key for t in GRID.tiles()[2:10]]
    # The other call in flight (the last six tiles) may have batches done too: the two take turns.
    assert set(third_call[:2]) <= done_while_held and not set(third_call[2:]) & done_while_held, done_while_held

    report = outcome["report"]
    assert report["status"] == "succeeded" and report["summary"]["tiles_segmented"] == 16
    assert report["tasks"]["segment_batches"] == 16 and report["tasks"]["segment_calls"] < 8, report["tasks"]
    assert Counter(window_calls(faults / "run1")) == {t.origin: 1 for t in GRID.tiles()}
    assert_same_labels(slide, "calls")


def test_a_model_actor_killed_mid_run_is_restarted_and_the_output_is_unchanged(slide, faults):
    before = array_checksums(slide)

    report = segment(dict(input=slide, label_name="crashed", **faulty(slide, faults / "run1",
                                                                      crash_at=origin_option(1, 2))), progress=False)

    assert (faults / "run1" / "crashed").exists()  # the actor's process really died on that window
    assert origin(1, 2) in window_calls(faults / "run1")  # and the restarted actor segmented it
    assert report["status"] == "succeeded" and report["summary"]["tiles_segmented"] == 16
    assert_same_labels(slide, "crashed")
    assert array_checksums(slide) == before


def test_a_killed_driver_is_resumed_by_rerunning_the_same_spec(slide, faults, ray_cluster):
    spec = faults / "spec.yaml"
    # Slowly (time to kill the driver mid-run); JSON is YAML too.
    spec.write_text(json.dumps(dict(input=slide, label_name="killed", **faulty(slide, faults / "run1", delay=0.4))))
    before = array_checksums(slide)
    # The driver runs the job entrypoint in its own process, joined to the test's Ray cluster.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "segment.py"), str(spec), "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while len(done_tiles(slide, "killed")) < 4 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    output = driver.communicate()[0]
    assert driver.returncode == -signal.SIGKILL, output
    time.sleep(2)  # results already on their way to storage land, or are lost with the driver
    finished = done_tiles(slide, "killed")
    assert 4 <= len(finished) < 16, output
    first_run = window_calls(faults / "run1")

    # The same spec again, without --overwrite: it resumes.
    assert main(["run", str(spec), "--no-progress"]) == 0

    report = json.loads(Path(slide, "labels", "killed", "report.json").read_text())
    assert report["summary"]["tiles_resumed"] == len(finished)
    assert report["summary"]["tiles_segmented"] == 16 - len(finished)
    finished_origins = {t.origin for t in GRID.tiles() if t.key in finished}
    assert finished_origins <= set(first_run)
    second_run = calls_since(faults / "run1", first_run)
    assert set(second_run) == {t.origin for t in GRID.tiles()} - finished_origins  # nothing finished redone
    assert set(second_run.values()) == {1}
    assert_same_labels(slide, "killed")
    assert not Path(slide, "labels", "killed", "work").exists()
    assert array_checksums(slide) == before


def test_a_tile_that_always_fails_fails_the_run_with_its_coordinates_then_resumes(slide, faults, capsys):
    before = array_checksums(slide)
    argv = ["segment", slide, "--nuclear", "DAPI", "--segmenter", FAULTY, "--segmenter-option", f"labels={slide}",
            "--segmenter-option", f"folder={faults / 'run1'}", "--segmenter-option", f"fail_at={origin_option(2, 1)}",
            "--label-name", "failing",
            "--tile", "128", "--halo", "32", "--band", "8", "--chunk", "64", "--batch-size", "4", "--workers", "1",
            "--no-tissue-mask", "--no-qc-images", "--no-progress"]

    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("cellsam-ray: failed: 1 tile(s) failed on every attempt: tile r00002_c00001 "
                            "(rows 256..384, columns 128..256): RuntimeError: injected failure at window (224, 96)")
    report = json.loads(Path(slide, "labels", "failing", "report.json").read_text())
    assert report["status"] == "failed" and report["summary"]["tiles_failed"] == 1
    assert report["errors"][0]["tile"] == "r00002_c00001" and report["errors"][0]["core"] == [256, 128, 384, 256]
    assert done_tiles(slide, "failing") == {t.key for t in GRID.tiles()} - {"r00002_c00001"}
    assert array_checksums(slide) == before

    # Once the cause is gone, the same command retries that tile alone.
    first_run = window_calls(faults / "run1")
    (faults / "run1" / "mended").touch()
    assert main(argv) == 0
    report = json.loads(Path(slide, "labels", "failing", "report.json").read_text())
    assert report["status"] == "succeeded" and report["summary"]["tiles_resumed"] == 15
    assert calls_since(faults / "run1", first_run) == {origin(2, 1): 1}
    assert_same_labels(slide, "failing")


def test_cuda_out_of_memory_halves_the_batch_down_to_what_fits(slide, faults):
    report = segment(dict(input=slide, label_name="oom", **faulty(slide, faults / "run1", oom_above=1)), progress=False)

    # One actor: its first batch of 4 ran out of memory, then 2; every later batch went one tile at a time.
    oom = sorted(int(p.name.split(".")[0]) for p in (faults / "run1" / "oom").iterdir())
    assert oom == [2, 4]
    assert Counter(window_calls(faults / "run1")) == {t.origin: 1 for t in GRID.tiles()}
    assert report["summary"]["tiles_segmented"] == 16
    assert_same_labels(slide, "oom")


def test_a_segmenter_that_cannot_be_built_fails_the_run_at_once(slide, tmp_path, capsys):
    nowhere = tmp_path / "no-such-truth.npy"  # the oracle cannot know its cells
    argv = ["segment", slide, "--nuclear", "DAPI", "--segmenter", "cellsam_ray.testing.oracle:GroundTruthSegmenter",
            "--segmenter-option", f"labels={nowhere}", "--label-name", "unbuilt", "--tile", "128", "--halo", "32",
            "--chunk", "64", "--no-progress"]

    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("cellsam-ray: failed: the model actors cannot start: FileNotFoundError: "), error
    assert str(nowhere) in error


@pytest.fixture(scope="module")
def two_machines():
    """A cluster whose model actors can only run on its two 1-CPU worker nodes (the head has no CPUs)."""
    with RayNodes(cpus=(0, 1, 1), env={"RAY_AUTH_MODE": "token"}) as nodes:
        yield nodes


def submit(spec: Path, cluster: RayNodes) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cellsam_ray.cli", "submit", str(spec), "--address",
                             cluster.dashboard_url, "--wait"], env={**os.environ, "RAY_AUTH_MODE": "token"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_model_actor_asks_for_no_more_cpus_than_one_node_has(slide, faults, two_machines):
    """Two CPUs in the cluster, one per node: one actor asking for all of them would wait forever."""
    spec = faults / "spec.yaml"
    spec.write_text(json.dumps(dict(faulty(slide, faults / "run1"), input=slide, label_name="one-actor", workers=1)))
    job = submit(spec, two_machines)
    output = job.communicate(timeout=240)[0]
    assert job.returncode == 0, output
    assert_same_labels(slide, "one-actor")


def test_a_lost_worker_node_costs_only_its_tiles(slide, faults, two_machines):
    spec = faults / "spec.yaml"
    spec.write_text(json.dumps(dict(faulty(slide, faults / "run1", delay=0.5), input=slide, label_name="lost",
                                    workers=2, batch_size=2)))
    before = array_checksums(slide)
    job = submit(spec, two_machines)
    deadline = time.monotonic() + 180
    while len(done_tiles(slide, "lost")) < 4 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    finished = done_tiles(slide, "lost")
    assert job.poll() is None, job.communicate()[0]  # still running when the machine goes

    two_machines.kill("worker1")  # one model actor's machine is gone, with the tiles it was holding
    two_machines.add_worker(1)  # and a replacement joins, as an autoscaler would start one

    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output
    assert 4 <= len(finished) < 16, output
    report = json.loads(Path(slide, "labels", "lost", "report.json").read_text())
    assert report["status"] == "succeeded" and report["summary"]["tiles_segmented"] == 16
    assert len(report["nodes"]) == 2  # the surviving worker node and the replacement
    calls = Counter(window_calls(faults / "run1"))
    assert set(calls) == {t.origin for t in GRID.tiles()}
    assert all(calls[t.origin] == 1 for t in GRID.tiles() if t.key in finished)  # finished tiles not redone
    assert_same_labels(slide, "lost")
    assert array_checksums(slide) == before


def two_running_workers(cluster: RayNodes) -> list[str]:
    """The names of two running worker nodes, starting more as needed (earlier tests kill some)."""
    while len(cluster.running_workers()) < 2:
        cluster.add_worker(1)
    return cluster.running_workers()[:2]


def test_a_node_lost_after_the_last_batch_does_not_fail_the_finished_job(slide, faults, two_machines):
    """Every tile is segmented, but one model actor's node is gone by the time the run asks its actors
    for their memory and node: those facts are best effort, so the run succeeds without that actor's.

    The point is fixed, not raced: the last tile is held on one node until every other tile is done;
    then the other node is killed and the last tile released at once, so the driver asks a lost actor
    that cannot have answered (Ray reports it unavailable or dead: a failed answer, not a late one).
    """
    workers = two_running_workers(two_machines)
    spec = faults / "spec.yaml"
    spec.write_text(json.dumps(dict(faulty(slide, faults / "run1", hold_at=origin_option(3, 3), barrier=2), input=slide,
                                    label_name="lost-at-end", workers=2, batch_size=2)))
    before = array_checksums(slide)
    # Both actors start before any window is segmented (the barrier), so they take batches in turn, as
    # the premise below needs: an actor gets tiles once started, and one that started alone first could
    # take the last two batches, (3, 0)-(3, 1) stuck behind the held one until another actor backs it up.
    job = submit(spec, two_machines)
    held = faults / "run1" / "held"
    deadline = time.monotonic() + 180
    # (3, 3) shares the last batch with (3, 2), whose result is written with it: 14 tiles done before.
    while not (any(held.glob("*")) and len(done_tiles(slide, "lost-at-end")) == 14):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.2)
    holder = two_machines.node_of(int(next(held.glob("*")).name))
    lost = next(name for name in workers if name != holder)

    two_machines.kill(lost)
    (faults / "run1" / "release").touch()

    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output
    report = json.loads(Path(slide, "labels", "lost-at-end", "report.json").read_text())
    assert report["status"] == "succeeded" and report["summary"]["tiles_segmented"] == 16
    assert len(report["nodes"]) == len(report["actor_peak_rss_mb"]) == 1  # the lost actor is left out
    assert Counter(window_calls(faults / "run1")) == {t.origin: 1 for t in GRID.tiles()}
    assert_same_labels(slide, "lost-at-end")
    assert array_checksums(slide) == before


def test_a_lost_worker_node_without_replacement_costs_time_not_the_run(slide, faults, two_machines):
    """No room to restart the lost node's actor: once the queue is empty, the surviving actor also runs
    the batches the lost one held (after the spec's backup_after_s), instead of the job waiting forever."""
    two_running_workers(two_machines)
    spec = faults / "spec.yaml"
    spec.write_text(json.dumps(dict(faulty(slide, faults / "run1", delay=0.5), input=slide, label_name="lost-for-good",
                                    workers=2, batch_size=2, backup_after_s=5)))
    job = submit(spec, two_machines)
    deadline = time.monotonic() + 180
    while len(done_tiles(slide, "lost-for-good")) < 4 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, job.communicate()[0]

    survivor, lost = two_machines.running_workers()
    two_machines.kill(lost)

    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output
    report = json.loads(Path(slide, "labels", "lost-for-good", "report.json").read_text())
    assert report["status"] == "succeeded" and report["summary"]["tiles_segmented"] == 16
    assert len(report["nodes"]) == 1  # the lost node's actor never came back
    assert set(window_calls(faults / "run1")) == {t.origin for t in GRID.tiles()}
    assert_same_labels(slide, "lost-for-good")
