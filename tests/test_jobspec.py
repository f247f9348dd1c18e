"""Job spec files: YAML and JSON from paths and URLs, the examples in jobs/examples, secrets kept out,
and the local example run end to end with the oracle, its report checked against schemas/report.schema.json."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import fsspec
import numpy as np
import pytest

from cellsam_ray.cli import main
from cellsam_ray.driver.windows import plan_run
from cellsam_ray.errors import UserError
from cellsam_ray.io.ngff import open_image
from cellsam_ray.jobspec import load_job_spec, portable_fields
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import array_checksums

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "jobs" / "examples").glob("*.yaml"))


def test_there_are_local_s3_and_multiplexed_examples():
    assert {p.name for p in EXAMPLES} >= {"local-demo.yaml", "s3-slide.yaml", "multiplexed.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses_and_holds_no_secret(path):
    spec = load_job_spec(str(path))
    assert spec.nuclear and spec.input
    text = path.read_text().lower()
    assert "secret_access_key:" not in text.replace("slides_aws_secret_access_key", "")


def test_the_s3_example_takes_its_credentials_from_the_environment(monkeypatch):
    spec = load_job_spec(str(ROOT / "jobs" / "examples" / "s3-slide.yaml"))
    assert spec.input.startswith("s3://") and spec.storage_options is None
    with pytest.raises(UserError, match="SLIDES_AWS_ACCESS_KEY_ID, which is not set here"):
        spec.storage.options()
    monkeypatch.setenv("SLIDES_AWS_ACCESS_KEY_ID", "AKIA-EXAMPLE")
    monkeypatch.setenv("SLIDES_AWS_SECRET_ACCESS_KEY", "example-secret")
    assert spec.storage.options() == {"key": "AKIA-EXAMPLE", "secret": "example-secret"}
    # Resolved where it is used, in each process: the spec and what carries it hold only the names.
    assert "example-secret" not in json.dumps(spec.model_dump(mode="json"))
    assert b"example-secret" not in pickle.dumps(spec.storage)


def test_the_multiplexed_example_names_channels_a_multiplexed_slide_has(tmp_path):
    spec = load_job_spec(str(ROOT / "jobs" / "examples" / "multiplexed.yaml"))
    assert len(spec.whole_cell) >= 3
    url = str(tmp_path / "codex.ome.zarr")
    write_synthetic_slide(url, size=(256, 256), channels=11, ngff="0.5", seed=1, chunk=128)
    local = spec.model_copy(update=dict(input=url, weights=None, segmenter="cellsam_ray.testing.oracle:GroundTruthSegmenter",
                                        segmenter_options=dict(labels=url), storage_profile=None, tile=128, halo=32,
                                        chunk=64))
    plan = plan_run(local)
    assert len(plan.channels) == 1 + len(spec.whole_cell)  # every marker found, each read once
    assert [len(role) for role in plan.roles] == [1, len(spec.whole_cell)]


def test_yaml_and_json_from_a_path_or_an_object_store_url(tmp_path, s3_prefix, storage_options):
    fields = {"input": "s3://bucket/slide.ome.zarr", "nuclear": ["DAPI"], "whole_cell": ["CD45", "CD3"], "tile": 512}
    (tmp_path / "spec.json").write_text(json.dumps(fields))
    (tmp_path / "spec.yml").write_text("input: s3://bucket/slide.ome.zarr\nnuclear: [DAPI]\n"
                                       "whole_cell: [CD45, CD3]\ntile: 512\n")
    with fsspec.open(f"{s3_prefix}/spec.yaml", "wt", **storage_options) as f:
        f.write((tmp_path / "spec.yml").read_text())
    specs = [load_job_spec(str(tmp_path / "spec.json")), load_job_spec(str(tmp_path / "spec.yml")),
             load_job_spec(f"{s3_prefix}/spec.yaml", storage_options)]
    assert all(s == specs[0] for s in specs) and specs[0].whole_cell == ["CD45", "CD3"]


@pytest.mark.parametrize("options", [{"key": "AKIA"}, {"secret": "s"}, {"token": "t"},
                                     {"client_kwargs": {"aws_session_token": "t"}}])
def test_inline_secrets_are_refused(tmp_path, options):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"input": "s3://b/s.ome.zarr", "nuclear": ["DAPI"], "storage_options": options}))
    with pytest.raises(UserError, match="holds a secret"):
        load_job_spec(str(path))


def test_portable_fields_keep_what_was_set_with_absolute_local_paths(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("input: slides/a.ome.zarr\nnuclear: [DAPI]\nweights: s3://m/w.pt\nconfig: v1.2\n")
    fields = portable_fields(load_job_spec(str(path)), base=tmp_path)
    assert fields == {"input": str(tmp_path / "slides" / "a.ome.zarr"), "nuclear": ["DAPI"],
                      "weights": "s3://m/w.pt", "config": "v1.2"}


def test_local_paths_sent_to_another_machine_get_a_note_and_the_job_names_those_its_node_lacks(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("input: slides/gone.ome.zarr\nnuclear: [DAPI]\nweights: /models/w.pt\nconfig: sizes.json\n"
                    "work_dir: /scratch/work\n")
    # Submitting to a head elsewhere: a note before anything is sent (here the head cannot be reached).
    assert main(["submit", str(spec), "--address", "http://gpu-head.invalid:8265"]) == 2
    note, error = capsys.readouterr().err.strip().splitlines()
    assert note == (f"cellsam-ray: note: the spec names local paths (input {Path.cwd()}/slides/gone.ome.zarr, "
                    f"weights /models/w.pt, work_dir /scratch/work, config {Path.cwd()}/sizes.json): they must exist "
                    "on the cluster's nodes (the job checks before any model starts); URLs (s3://...) reach them "
                    "from anywhere")
    assert "cannot reach a Ray dashboard at http://gpu-head.invalid:8265" in error
    # The job's first check, on the node that runs it: one line naming each missing path (not the work folder).
    assert main(["run", str(spec)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("cellsam-ray: error: the spec's local paths do not exist on this node (")
    assert f"input {Path.cwd()}/slides/gone.ome.zarr, weights /models/w.pt, config {Path.cwd()}/sizes.json;" in line


def test_the_local_example_runs_end_to_end_with_the_oracle(tmp_path, monkeypatch, ray_cluster, capsys):
    """What the README tells a new user to run, from a folder holding the demo slide."""
    jsonschema = pytest.importorskip("jsonschema")
    monkeypatch.chdir(tmp_path)
    slide = tmp_path / "demo-output" / "slide.ome.zarr"
    write_synthetic_slide(str(slide), size=(768, 768), channels=4, ngff="0.5", seed=7, chunk=256)
    before = array_checksums(str(slide))

    assert main(["run", str(ROOT / "jobs" / "examples" / "local-demo.yaml"), "--no-progress"]) == 0

    summary = json.loads(capsys.readouterr().out)
    report = json.loads((slide / "labels" / "job-cells" / "report.json").read_text())
    jsonschema.validate(report, json.loads((ROOT / "schemas" / "report.schema.json").read_text()))
    assert report["summary"] == summary and report["status"] == "succeeded" and report["errors"] == []
    assert report["spec"]["whole_cell"] == ["E-cadherin"] and report["summary"]["tiles"] == 4
    truth = np.asarray(open_image(str(slide)).label("ground_truth").array(0)[:])
    assert summary["cells"] == len(np.unique(truth)) - 1
    assert array_checksums(str(slide)) == before
