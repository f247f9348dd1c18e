"""Job submission on a real two-node Ray cluster (``ray start --head`` + ``ray start --address``) with
token authentication, driven through the ``cellsam-ray`` command line as a user would, in subprocesses.

The model is the ground-truth oracle, so the job runs in seconds; what is tested is the path from a spec
file on this machine to model actors on both nodes, and back to an exit status.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cellsam_ray.io.ngff import open_image
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import array_checksums
from cellsam_ray.testing.cluster import RayNodes

ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"
SLOW_ORACLE = "cellsam_ray.testing.faults:FaultySegmenter"


@pytest.fixture(scope="module")
def cluster():
    with RayNodes(cpus=(1, 1), env={"RAY_AUTH_MODE": "token"}) as nodes:
        yield nodes


def cellsam_ray(*args: str, cwd=None, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RAY_AUTH_MODE": "token", **env}
    return subprocess.run([sys.executable, "-m", "cellsam_ray.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def write_spec(path, **fields) -> None:
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "\n")


def test_cluster_listens_on_loopback_only(cluster):
    addresses = cluster.listening_addresses()
    assert "127.0.0.1" in addresses  # the check sees the nodes' servers at all
    assert addresses == {"127.0.0.1"}


def test_submitted_job_runs_model_actors_on_both_nodes(cluster, tmp_path):
    slide = tmp_path / "slide.ome.zarr"
    write_synthetic_slide(str(slide), size=(512, 384), channels=2, ngff="0.5", seed=4, chunk=128)
    before = array_checksums(str(slide))
    # A relative input path, and options naming the truth and a folder relatively: submit makes them absolute
    # before the spec leaves this machine.
    # The oracle (through cellsam_ray.testing.faults), both actors built before any window is segmented: an actor
    # gets tiles once started, and one that started alone could finish 12 tiles before the other answered.
    write_spec(tmp_path / "spec.yaml", input="slide.ome.zarr", nuclear=["DAPI"], segmenter=SLOW_ORACLE,
               segmenter_options=dict(labels="slide.ome.zarr", folder="calls", barrier=2), tile=128, halo=32, band=8,
               chunk=64, workers=2, cell_table=False, qc_images=False)
    (tmp_path / "calls").mkdir()

    done = cellsam_ray("submit", "spec.yaml", "--address", cluster.dashboard_url, "--wait", cwd=tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "PROGRESS {" in done.stdout  # the job's progress lines, streamed by --wait
    report = json.loads((slide / "labels" / "cells" / "report.json").read_text())
    assert report["status"] == "succeeded"
    assert len(report["nodes"]) == 2  # one model actor on each of the cluster's two nodes
    image = open_image(str(slide))
    truth = np.asarray(image.label("ground_truth").array(0)[:])
    assert report["summary"]["cells"] == len(np.unique(truth)) - 1
    assert array_checksums(str(slide)) == before

    status = cellsam_ray("status", job_id, "--address", cluster.dashboard_url)
    assert status.returncode == 0 and f"{job_id} SUCCEEDED" in status.stdout
    logs = cellsam_ray("logs", job_id, "--address", cluster.dashboard_url)
    assert logs.returncode == 0 and '"tiles_segmented": 12' in logs.stdout


def test_failed_job_gives_its_status_and_one_line_reason(cluster, tmp_path):
    slide = tmp_path / "slide.ome.zarr"
    write_synthetic_slide(str(slide), size=(256, 256), channels=2, ngff="0.5", seed=5, chunk=128)
    # Valid as a spec, wrong for this slide: found by the plan on the cluster, before any model starts.
    write_spec(tmp_path / "spec.yaml", input=str(slide), nuclear=["DAPl"], segmenter=ORACLE,
               segmenter_options=dict(labels=str(slide)), tile=128, halo=32, chunk=64)

    done = cellsam_ray("submit", str(tmp_path / "spec.yaml"), "--address", cluster.dashboard_url, "--wait")

    assert done.returncode == 1
    assert "nuclear channel 'DAPl' is not in the image; available: DAPI, E-cadherin" in done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("cellsam-ray: job raysubmit_")
    assert "FAILED" in done.stderr
    job_id = done.stdout.splitlines()[0] if done.stdout.startswith("raysubmit_") else \
        done.stderr.strip().splitlines()[-1].split()[2]
    status = cellsam_ray("status", job_id, "--address", cluster.dashboard_url)
    assert status.returncode == 1 and f"{job_id} FAILED" in status.stdout  # scripts can tell


def test_a_job_whose_local_paths_its_node_lacks_fails_first_naming_them(cluster, tmp_path):
    """Nothing but the spec travels with a job: paths of the submitting machine must exist on the nodes."""
    write_spec(tmp_path / "spec.yaml", input=str(tmp_path / "elsewhere.ome.zarr"), nuclear=["DAPI"],
               weights=str(tmp_path / "model.pt"))

    done = cellsam_ray("submit", str(tmp_path / "spec.yaml"), "--address", cluster.dashboard_url, "--wait")

    assert done.returncode == 1 and "FAILED" in done.stderr
    assert (f"the spec's local paths do not exist on this node ({socket.gethostname()}): input "
            f"{tmp_path}/elsewhere.ome.zarr, weights {tmp_path}/model.pt;") in done.stdout


def test_a_secret_in_the_shell_stays_behind(cluster, tmp_path):
    """A job's runtime_env is kept by Ray and shown by its dashboard: read it back from the cluster. What a
    segmenter needs travels in the spec; nothing of the shell goes with it."""
    slide = tmp_path / "slide.ome.zarr"
    write_synthetic_slide(str(slide), size=(128, 128), channels=2, ngff="0.5", seed=5, chunk=64)
    write_spec(tmp_path / "spec.yaml", input=str(slide), nuclear=["DAPl"], segmenter=ORACLE,
               segmenter_options=dict(labels=str(slide)))
    secrets = dict(CELLSAM_RAY_MY_SECRET_TOKEN="hunter2", CELLSAM_RAY_API_KEY="k3y", CELLSAM_RAY_DB_Password="pw",
                   CELLSAM_RAY_CREDENTIALS_FILE="/home/me/creds")

    done = cellsam_ray("submit", str(tmp_path / "spec.yaml"), "--address", cluster.dashboard_url, "--wait",
                       **secrets)

    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_"), done.stdout + done.stderr
    shown = subprocess.run(
        [sys.executable, "-c", "import json, sys; from ray.job_submission import JobSubmissionClient; "
         "print(json.dumps(JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2]).runtime_env))",
         cluster.dashboard_url, job_id],
        env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    runtime_env = json.dumps(json.loads(shown.stdout.splitlines()[-1]))
    assert not [word for word in [*secrets, "hunter2", "k3y", "pw", "/home/me/creds"] if word in runtime_env]


def test_client_errors_are_one_line(cluster):
    unknown = cellsam_ray("status", "raysubmit_nosuchjob", "--address", cluster.dashboard_url)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "raysubmit_nosuchjob" in unknown.stderr

    no_token = cellsam_ray("status", "raysubmit_nosuchjob", "--address", cluster.dashboard_url,
                           RAY_AUTH_MODE="disabled")
    assert no_token.returncode == 2 and no_token.stderr.count("\n") == 1
    assert "set RAY_AUTH_MODE=token" in no_token.stderr

    nowhere = cellsam_ray("status", "raysubmit_nosuchjob", "--address", "http://127.0.0.1:9")
    assert nowhere.returncode == 2 and "cannot reach a Ray dashboard at http://127.0.0.1:9" in nowhere.stderr


def test_a_stopped_job_resumes_when_its_spec_is_submitted_again(cluster, tmp_path):
    slide = tmp_path / "slide.ome.zarr"
    write_synthetic_slide(str(slide), size=(512, 512), channels=2, ngff="0.5", seed=6, chunk=128)
    # The oracle, slowed down (cellsam_ray.testing.faults), so that the job is still running when it is stopped.
    write_spec(tmp_path / "spec.yaml", input=str(slide), nuclear=["DAPI"], segmenter=SLOW_ORACLE,
               segmenter_options=dict(labels=str(slide), folder=str(tmp_path / "calls"), delay=0.5), tile=128,
               halo=32, band=8, chunk=64, workers=2, batch_size=2, tissue_mask=False, cell_table=False,
               qc_images=False)
    submitted = cellsam_ray("submit", str(tmp_path / "spec.yaml"), "--address", cluster.dashboard_url)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    work = slide / "labels" / "cells" / "work" / "candidates"
    deadline = time.monotonic() + 180
    while len(list(work.glob("*.done"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)

    stopped = cellsam_ray("stop", job_id, "--address", cluster.dashboard_url)

    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job_id} STOPPED", stopped.stdout + stopped.stderr
    kept = len(list(work.glob("*.done")))
    assert 2 <= kept < 16
    again = cellsam_ray("submit", str(tmp_path / "spec.yaml"), "--address", cluster.dashboard_url, "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    report = json.loads((slide / "labels" / "cells" / "report.json").read_text())
    assert report["status"] == "succeeded" and report["summary"]["tiles_resumed"] >= kept
    assert report["summary"]["tiles_resumed"] + report["summary"]["tiles_segmented"] == 16
