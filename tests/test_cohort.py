"""Many slides in one run (issue 27): each slide gets the labels a one-slide run gives, one pool of model
actors serves them all, bad slides are listed at once before any model time, a slide that fails is recorded
while the others go on, a rerun skips the finished slides and resumes the unfinished one, and the cohort
report lists every slide."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from cellsam_ray.cli import main
from cellsam_ray.driver.slides import SlideInput, named_slides
from cellsam_ray.io.ngff import open_image
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import array_checksums, label_chunk_files
from cellsam_ray.testing.faults import window_calls
from cellsam_ray.tiling import plan_grid

SLIDES = {"a": ((512, 512), 1), "b": ((384, 448), 2), "c": ((320, 512), 3)}  # name: (size, seed)
BUNDLED = ["--nuclear", "DAPI", "--tile", "192", "--halo", "32", "--chunk", "64", "--no-progress"]
FAULTY = "cellsam_ray.testing.faults:FaultySegmenter"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A study folder of three slides of different sizes and cells."""
    folder = tmp_path_factory.mktemp("study")
    for name, (size, seed) in SLIDES.items():
        write_synthetic_slide(str(folder / f"{name}.ome.zarr"), size=size, channels=2, ngff="0.5", seed=seed, chunk=128)
    return folder


def slide(study: Path, name: str) -> str:
    return str(study / f"{name}.ome.zarr")


def rows_of(report: Path) -> list[dict]:
    return pq.read_table(report / "cohort.parquet").to_pylist()


def report_of(url: str, label: str) -> dict:
    return json.loads(Path(url, "labels", label, "report.json").read_text())


def test_a_cohort_gives_each_slide_the_labels_a_one_slide_run_gives(study, ray_cluster, tmp_path, capsys):
    before = {name: array_checksums(slide(study, name)) for name in SLIDES}
    argv = ["segment", str(study / "*.ome.zarr"), *BUNDLED, "--label-name", "cohort",
            "--cohort-report", str(tmp_path / "report"), "--slides-at-once", "3"]

    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("model actors:") == 1, err  # one pool for the cohort: the weights loaded once per actor

    rows = rows_of(tmp_path / "report")
    assert [row["url"] for row in rows] == [slide(study, name) for name in sorted(SLIDES)]
    for name, row in zip(sorted(SLIDES), rows):
        url = slide(study, name)
        assert main(["segment", url, *BUNDLED, "--label-name", "single"]) == 0
        files, expected = label_chunk_files(url, "cohort"), label_chunk_files(url, "single")
        assert sorted(files) == sorted(expected) and len(files) > 4
        assert all(files[path] == expected[path] for path in files), f"labels differ in {name}"
        for outlines in ("cells.geojson", "cells.geoparquet"):
            ours, alone = (Path(url, "labels", label, outlines).read_bytes() for label in ("cohort", "single"))
            assert ours == alone, f"{outlines} differs in {name}"
        ours, alone = report_of(url, "cohort"), report_of(url, "single")
        assert ours["status"] == "succeeded" and ours["summary"]["cells"] == alone["summary"]["cells"] > 0
        assert row["status"] == "succeeded" and row["cells"] == ours["summary"]["cells"]
        assert row["report"] == str(Path(url, "labels", "cohort", "report.json"))
        assert {"cohort", "single"} <= set(open_image(url).label_names)
        assert array_checksums(url) == before[name]  # the input's arrays untouched
    page = (tmp_path / "report" / "cohort.html").read_text()
    assert page.count("<img src='data:image/jpeg;base64,") == 3 and "3 succeeded" in page


def test_bad_slides_are_listed_at_once_before_any_model_time(study, tmp_path, capsys):
    manifest = tmp_path / "slides.csv"
    manifest.write_text("url,nuclear\n"
                        f"{slide(study, 'a')},\n"
                        f"{study / 'missing.ome.zarr'},\n"
                        f"{slide(study, 'b')},Hoechst\n")  # b names a channel it lacks
    argv = ["segment", str(manifest), *BUNDLED, "--label-name", "bad", "--cohort-report", str(tmp_path / "report")]

    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("cellsam-ray: error: 2 of 3 slides cannot be segmented: "), line
    assert "missing.ome.zarr" in line and "Hoechst" in line and "--skip-bad-slides" in line
    assert not (tmp_path / "report").exists()
    assert "bad" not in open_image(slide(study, "a")).label_names and not Path(slide(study, "a"), "labels", "bad").exists()


def test_skipped_bad_slides_are_listed_in_the_cohort_report(study, ray_cluster, tmp_path):
    argv = ["segment", slide(study, "c"), str(study / "missing.ome.zarr"), *BUNDLED, "--label-name", "skipping",
            "--cohort-report", str(tmp_path / "report"), "--skip-bad-slides", "--no-cell-table"]

    assert main(argv) == 0
    rows = {row["url"]: row for row in rows_of(tmp_path / "report")}
    assert rows[slide(study, "c")]["status"] == "succeeded"
    missing = rows[str(study / "missing.ome.zarr")]
    assert missing["status"] == "invalid" and "missing.ome.zarr" in missing["error"]


def test_a_failing_slide_is_recorded_the_others_go_on_and_a_rerun_resumes_it(study, ray_cluster, tmp_path, capsys):
    """A tile of slide a fails on every attempt (its origin lies outside slide c); a rerun of the same command
    once the cause is gone skips c, finished, and segments a's failed tile alone."""
    a, c = slide(study, "a"), slide(study, "c")
    grid = plan_grid(512, 512, tile=128, halo=32, chunk=64, band=16)
    bad = grid.tile_at(3, 1).origin  # row 3: slide c (320 px high) has rows 0..2
    calls = tmp_path / "calls"
    argv = ["segment", a, c, "--nuclear", "DAPI", "--segmenter", FAULTY, "--segmenter-option", f"labels={a}",
            "--segmenter-option", f"folder={calls}", "--segmenter-option", "fail_at={},{}".format(*bad),
            "--tile", "128", "--halo", "32", "--chunk", "64", "--no-tissue-mask", "--workers", "1",
            "--label-name", "faulty", "--cohort-report", str(tmp_path / "report"), "--no-progress"]
    before = {url: array_checksums(url) for url in (a, c)}

    assert main(argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"cellsam-ray: failed: 1 of 2 slides did not finish: {a}: 1 tile(s) failed on every "
                           "attempt: tile r00003_c00001"), line
    rows = {row["url"]: row for row in rows_of(tmp_path / "report")}
    assert rows[a]["status"] == "failed" and rows[a]["tiles_failed"] == 1
    assert rows[c]["status"] == "succeeded"
    assert "faulty" in open_image(c).label_names and "faulty" not in open_image(a).label_names
    assert report_of(a, "faulty")["status"] == "failed"

    first = window_calls(calls)
    (calls / "mended").touch()
    assert main(argv) == 0
    rows = {row["url"]: row for row in rows_of(tmp_path / "report")}
    assert rows[a]["status"] == "succeeded" and rows[c]["status"] == "finished_earlier"
    assert rows[c]["cells"] == report_of(c, "faulty")["summary"]["cells"]
    assert Counter(window_calls(calls)) - Counter(first) == {bad: 1}  # a's failed tile alone, nothing of c again
    assert report_of(a, "faulty")["summary"]["tiles_resumed"] == len(grid) - 1
    assert {url: array_checksums(url) for url in (a, c)} == before


def test_a_stopped_cohort_ends_each_held_slide_stopped_and_a_rerun_resumes_it(study, ray_cluster, tmp_path):
    """SIGTERM (``ray job stop``, a cluster going down) while slide a's tile is on the model: the driver
    exits 130 with one line; a's report says stopped, its label is not listed, its lease is given back;
    c, not started yet, is listed as such; the slides' bytes are untouched. The same command, run again,
    resumes a (only its unfinished tiles) and segments c."""
    a, c = slide(study, "a"), slide(study, "c")
    grid = plan_grid(512, 512, tile=128, halo=32, chunk=64, band=16)
    held_tile = grid.tile_at(3, 2)  # row 3: slide c (320 px high) has rows 0..2
    calls = tmp_path / "calls"
    argv = ["segment", a, c, "--nuclear", "DAPI", "--segmenter", FAULTY, "--segmenter-option", f"labels={a}",
            "--segmenter-option", f"folder={calls}", "--segmenter-option", "hold_at={},{}".format(*held_tile.origin),
            "--tile", "128", "--halo", "32", "--chunk", "64", "--no-tissue-mask", "--workers", "1",
            "--slides-at-once", "1", "--label-name", "stopped", "--cohort-report", str(tmp_path / "report"),
            "--no-progress"]
    before = {url: array_checksums(url) for url in (a, c)}
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "cellsam_ray.cli", *argv], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not ((calls / "held").is_dir() and any((calls / "held").iterdir())):
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)

    assert driver.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("cellsam-ray: stopped; finished slides and tiles are kept: rerun the same spec"), err
    rows = {row["url"]: row for row in rows_of(tmp_path / "report")}
    assert rows[a]["status"] == "stopped" and rows[c]["status"] == "not_started", rows
    assert report_of(a, "stopped")["status"] == "stopped"
    assert "stopped" not in open_image(a).label_names and not Path(c, "labels", "stopped").exists()
    done_before = len(list(Path(a, "labels", "stopped", "work", "candidates").glob("*.done")))
    assert 0 < done_before < len(grid)

    (calls / "release").touch()
    first = window_calls(calls)
    assert main(argv) == 0  # the lease was given back: taken at once
    rows = {row["url"]: row for row in rows_of(tmp_path / "report")}
    assert rows[a]["status"] == rows[c]["status"] == "succeeded", rows
    assert report_of(a, "stopped")["summary"]["tiles_resumed"] == done_before
    redone = Counter(window_calls(calls)) - Counter(first)
    c_tiles = len(plan_grid(320, 512, tile=128, halo=32, chunk=64, band=16))
    assert sum(redone.values()) == len(grid) - done_before + c_tiles  # a's unfinished tiles and c's, once each
    assert {url: array_checksums(url) for url in (a, c)} == before


# ------------------------------------------------------------------------------ which slides a spec names
def test_one_slide_is_not_a_cohort(study):
    assert named_slides(slide(study, "a")) == ([SlideInput(slide(study, "a"))], False)


def test_a_glob_a_folder_and_a_list_name_the_same_cohort(study):
    expected = [SlideInput(slide(study, name)) for name in sorted(SLIDES)]
    assert named_slides(str(study / "*.ome.zarr")) == (expected, True)
    assert named_slides(str(study)) == (expected, True)  # a folder that is not itself an image
    listed = [slide(study, "a"), str(study / "*.ome.zarr")]  # the same slide twice is one
    assert named_slides(listed) == (expected, True)


def test_manifests_name_slides_and_their_own_channels(study, tmp_path):
    (tmp_path / "cohort.txt").write_text(f"# study\n{slide(study, 'b')}\n\nrelative.ome.zarr\n")
    assert named_slides(str(tmp_path / "cohort.txt"))[0] == [SlideInput(slide(study, "b")),
                                                             SlideInput(str(tmp_path / "relative.ome.zarr"))]
    (tmp_path / "cohort.csv").write_text(f"input,nuclear,whole_cell\n{slide(study, 'a')},\"DAPI,H3\",\n"
                                         f"{slide(study, 'c')},,CD45\n")
    assert named_slides(str(tmp_path / "cohort.csv"))[0] == [
        SlideInput(slide(study, "a"), nuclear=("DAPI", "H3")), SlideInput(slide(study, "c"), whole_cell=("CD45",))]
    (tmp_path / "bad.csv").write_text("path\nx.ome.zarr\n")
    with pytest.raises(Exception, match="needs a column named url"):
        named_slides(str(tmp_path / "bad.csv"))


def test_an_s3_glob_names_the_slides_under_the_prefix(s3_prefix, storage_options):
    fs = fsspec.filesystem("s3", **storage_options)
    for name in ("one.ome.zarr", "two.ome.zarr", "notes.txt"):
        fs.pipe(f"{s3_prefix}/{name}/zarr.json" if name.endswith(".zarr") else f"{s3_prefix}/{name}", b"{}")
    slides, cohort = named_slides(f"{s3_prefix}/*.ome.zarr", storage_options)
    assert cohort and [s.url for s in slides] == [f"{s3_prefix}/one.ome.zarr", f"{s3_prefix}/two.ome.zarr"]
    assert [s.url for s in named_slides(s3_prefix, storage_options)[0]] == [s.url for s in slides]


def test_a_job_spec_names_a_cohort_as_a_list(study, tmp_path):
    from cellsam_ray.jobspec import load_job_spec

    (tmp_path / "cohort.yaml").write_text(f"input: [{slide(study, 'a')}, {slide(study, 'b')}]\nnuclear: [DAPI]\n"
                                          f"cohort_report: {tmp_path / 'report'}\nslides_at_once: 3\n")
    spec = load_job_spec(str(tmp_path / "cohort.yaml"))
    assert spec.input == [slide(study, "a"), slide(study, "b")] and spec.slides_at_once == 3
    assert named_slides(spec.input)[0] == [SlideInput(slide(study, "a")), SlideInput(slide(study, "b"))]
