"""GPU clusters as users run them, on this CPU machine with Ray's own facilities: nodes that declare GPUs
(Ray pins actors to them; none exist) and Ray's fake multi-node autoscaler, which launches such nodes on
demand and removes them when idle, as a KubeRay worker group with ``minReplicas: 0`` or a ``ray up`` node
type with ``min_workers: 0`` would: its node types are the GPU node types of ``deploy/aws/cluster.yaml`` and
the GPU worker group of ``deploy/kuberay/rayjob.yaml``, with their resources.

The segmenter is ``cellsam_ray.testing.faults:FaultySegmenter`` (the ground truth, recording where each window ran),
so no test needs CUDA, except the one proving that a GPU actor whose torch cannot use CUDA fails the run
before any tile. Every run is ``cellsam-ray segment`` in a subprocess, joined to the cluster by
``RAY_ADDRESS``, as a job's driver would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from cellsam_ray.io.ngff import open_image
from cellsam_ray.testing.checks import label_chunk_files, same_up_to_relabelling
from cellsam_ray.testing.cluster import AutoscalingNodes, RayNodes
from cellsam_ray.testing.ecosystem import disc_cells, fluorescence, write_with_ome_zarr_py
from cellsam_ray.testing.faults import window_places
from cellsam_ray.tiling import plan_grid

ROOT = Path(__file__).resolve().parents[1]

TILING = ["--tile", "256", "--halo", "32", "--chunk", "128", "--no-tissue-mask", "--no-cell-table",
          "--no-qc-images"]
SIZE = (1536, 1536)
GRID = plan_grid(*SIZE, tile=256, halo=32, chunk=128, band=16)  # 36 windows


def slide_with_truth(folder: Path, size: tuple[int, int], seed: int) -> str:
    truth = disc_cells(size, seed=seed)
    return write_with_ome_zarr_py(str(folder / "slide.ome.zarr"), fluorescence(truth, 2, np.uint16, seed=seed),
                                  version="0.5", chunks=(1, 256, 256), channel_names=["DAPI", "CD45"],
                                  ground_truth=truth)


def faulty(slide: str, calls: Path, **faults) -> list[str]:
    """The options that make the FaultySegmenter segment ``slide``, recording its windows in ``calls``."""
    options = dict(labels=slide, folder=str(calls), **faults)
    return ["--segmenter", "cellsam_ray.testing.faults:FaultySegmenter",
            *[f"--segmenter-option={name}={value}" for name, value in options.items()]]


def segment(address: str, slide: str, *args: str) -> subprocess.Popen:
    environment = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "cellsam_ray.cli", "segment", slide, "--nuclear", "DAPI",
                             *args], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(job: subprocess.Popen, timeout: float = 400) -> str:
    output = job.communicate(timeout=timeout)[0]
    assert job.returncode == 0, output
    return output


def report_of(slide: str, name: str) -> dict:
    return json.loads(Path(slide, "labels", name, "report.json").read_text())


def labels(slide: str, name: str) -> np.ndarray:
    return np.asarray(open_image(slide).label(name).array(0)[:])


# --------------------------------------------------------------------------------- scaling from zero
def deployed_gpu_types(deployment: str) -> dict[str, dict]:
    """The GPU node types of a deployment file (deploy/), as the fake autoscaler's node types: the same
    resources and minimum, at most 2 of each (this machine runs every node)."""
    if deployment == "aws":
        types = yaml.safe_load((ROOT / "deploy" / "aws" / "cluster.yaml").read_text())["available_node_types"]
        return {name: {"resources": kind["resources"], "min_workers": kind["min_workers"],
                       "max_workers": min(kind["max_workers"], 2)}
                for name, kind in types.items() if kind["resources"].get("GPU")}
    manifest = yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    job = next(doc for doc in manifest if doc["kind"] == "RayJob")
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return {g["groupName"]: {"resources": {"CPU": int(limits["cpu"]), "GPU": int(limits["nvidia.com/gpu"])},
                             "min_workers": g["minReplicas"], "max_workers": min(g["maxReplicas"], 2)}
            for g in groups for limits in [g["template"]["spec"]["containers"][0]["resources"]["limits"]]}


@pytest.fixture(scope="module", params=["aws", "kuberay"])
def autoscaling(request):
    """A head with 2 CPUs and no GPU, and the GPU node types of ``deploy/aws/cluster.yaml`` or of
    ``deploy/kuberay/rayjob.yaml``'s worker group, from 0 nodes, launched by the autoscaler."""
    with AutoscalingNodes(head_cpus=2, node_types=deployed_gpu_types(request.param)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def big_slide(autoscaling, tmp_path_factory):
    """A slide of its own for each autoscaling cluster."""
    return slide_with_truth(tmp_path_factory.mktemp("autoscaling"), SIZE, seed=24)


@pytest.fixture(scope="module")
def from_zero(autoscaling, big_slide, tmp_path_factory):
    """A run on the autoscaling cluster with no GPU node up: its output and where its windows ran. Its
    labels/cells is also the uninterrupted run that the run losing a node must reproduce."""
    assert autoscaling.worker_nodes() == {}  # no GPU node up: ray.cluster_resources() has no GPU
    calls = tmp_path_factory.mktemp("from-zero") / "calls"
    output = finished(segment(autoscaling.address, big_slide, *TILING, *faulty(big_slide, calls, delay=0.3)))
    return output, window_places(calls)


def test_a_cluster_that_scales_gpus_from_zero_launches_them_and_lets_them_go(autoscaling, big_slide, from_zero):
    output, places = from_zero
    assert Counter(p["origin"] for p in places) == {t.origin: 1 for t in GRID.tiles()}
    assert all(p["gpus"] for p in places), output  # every window ran in an actor holding a GPU
    assert len({p["node"] for p in places}) >= 2  # on the GPU nodes the autoscaler launched
    assert same_up_to_relabelling(labels(big_slide, "cells"), labels(big_slide, "ground_truth"))
    report = report_of(big_slide, "cells")
    pool = report["pool"]
    assert pool["growth"] == "probe" and pool["gpus_up"] == 0 and pool["each"] == {"GPU": 1.0, "CPU": 1.0}
    assert pool["asked"] == 5  # as many as 36 tiles keep busy: the autoscaler places what it may
    assert pool["started"] >= 2 and "the autoscaler adds GPU nodes" in pool["basis"]
    pinned = [(actor["node"], *actor["gpus"]) for actor in report["actors"]]
    assert len(set(pinned)) == len(pinned) == pool["started"] and all(len(p) == 2 for p in pinned)
    assert "model actors: 5 model actor(s) of 1 GPU, 1 CPU each" in output
    # Nothing the run asked for stays requested: the idle GPU nodes are removed.
    autoscaling.wait_for_workers(0, timeout=120)


def test_a_gpu_node_lost_mid_run_costs_only_its_tiles(autoscaling, big_slide, from_zero, tmp_path):
    autoscaling.wait_for_workers(0, timeout=120)  # from zero again
    work = Path(big_slide, "labels", "lost", "work", "candidates")
    job = segment(autoscaling.address, big_slide, *TILING, *faulty(big_slide, tmp_path / "calls", delay=1.0),
                  "--label-name", "lost")
    key_of = {t.origin: t.key for t in GRID.tiles()}

    def finished_by_node() -> dict[str, set[str]]:
        done = {p.name.removesuffix(".done") for p in work.glob("*.done")}
        by_node: dict[str, set[str]] = {}
        for place in window_places(tmp_path / "calls"):
            if key_of[place["origin"]] in done:
                by_node.setdefault(place["node"], set()).add(key_of[place["origin"]])
        return by_node

    # Wait until both GPU nodes have finished tiles (one actor may start well before the other).
    deadline = time.monotonic() + 240
    while not (len(autoscaling.worker_nodes()) >= 2 and len(by_node := finished_by_node()) >= 2
               and sum(map(len, by_node.values())) >= 8):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.2)
    done_before = set().union(*by_node.values())
    busy = Counter(p["node"] for p in window_places(tmp_path / "calls"))
    lost = max(autoscaling.worker_nodes(), key=lambda node: busy[node])

    autoscaling.kill_node(lost)  # the machine is gone, with the tiles its actor held

    output = finished(job)
    report = report_of(big_slide, "lost")
    assert report["status"] == "succeeded" and report["summary"]["tiles_segmented"] == len(GRID) == 36
    assert lost not in report["nodes"]
    places = window_places(tmp_path / "calls")
    calls = Counter(p["origin"] for p in places)
    assert set(calls) == {t.origin for t in GRID.tiles()}
    # Only the lost node's tiles are segmented again: a tile run twice ran there first (those it held; or
    # finished just as it went, before the driver heard); a tile finished elsewhere is never redone.
    on_lost = {p["origin"] for p in places if p["node"] == lost}
    again = {origin for origin, n in calls.items() if n > 1}
    assert again <= on_lost, output
    assert all(calls[t.origin] == 1 for t in GRID.tiles() if t.key in done_before and t.origin not in on_lost)
    assert len(done_before - {t.key for t in GRID.tiles() if t.origin in on_lost}) >= 1  # some work survived
    assert all(p["gpus"] for p in places)
    assert label_chunk_files(big_slide, "lost") == label_chunk_files(big_slide, "cells")  # byte-identical
    autoscaling.wait_for_workers(0, timeout=120)


# ------------------------------------------------------------------------------ declared GPUs, pinned
@pytest.fixture(scope="module")
def gpu_nodes():
    """A CPU head and two worker nodes declaring 2 GPUs and 4 CPUs each: 4 GPUs that do not exist."""
    with RayNodes(cpus=(2, 4, 4), gpus=(0, 2, 2), env={"RAY_AUTH_MODE": "disabled"}) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    return slide_with_truth(tmp_path_factory.mktemp("pinned"), (512, 1024), seed=25)


@pytest.mark.parametrize(("gpus_per_worker", "actors"), [(1.0, 4), (0.5, 8)])
def test_actors_are_pinned_one_per_gpu_or_share_one(gpu_nodes, small_slide, tmp_path, gpus_per_worker, actors):
    address = f"127.0.0.1:{gpu_nodes.gcs_port}"
    name = f"pinned-{actors}"
    # 32 windows of 128 px, one per batch: enough work for 16 actors; each must have started before any
    # window is segmented, so the report's actors are all that Ray placed.
    finished(segment(address, small_slide, "--tile", "128", "--halo", "32", "--chunk", "64",
                     "--batch-size", "1", "--gpus-per-worker", str(gpus_per_worker), "--label-name", name,
                     "--no-tissue-mask", "--no-cell-table", "--no-qc-images",
                     *faulty(small_slide, tmp_path / "calls", barrier=actors)))

    report = report_of(small_slide, name)
    assert report["pool"]["asked"] == report["pool"]["started"] == actors
    pairs = Counter((actor["node"], tuple(actor["gpus"])) for actor in report["actors"])
    assert len(pairs) == 4 and all(len(gpus) == 1 for _, gpus in pairs)  # 2 nodes × 2 GPUs, one GPU each
    assert set(pairs.values()) == {actors // 4}  # one actor per GPU, or two sharing each
    assert all(p["gpus"] for p in window_places(tmp_path / "calls"))


def test_a_gpu_actor_whose_torch_cannot_use_cuda_fails_the_run_before_any_tile(gpu_nodes, small_slide):
    """The bundled CellSAM on GPUs that do not exist: its torch finds no driver, as on a node with a
    CPU-only torch or no driver. The run must say so, not run the slide on the CPU while holding the GPUs."""
    address = f"127.0.0.1:{gpu_nodes.gcs_port}"
    tiling = ["--tile", "256", "--halo", "32", "--chunk", "128", "--no-cell-table", "--no-qc-images"]
    job = segment(address, small_slide, *tiling, "--label-name", "no-cuda")
    output = job.communicate(timeout=400)[0]

    assert job.returncode == 1, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("cellsam-ray: failed: the model actors cannot start: the model actor on node "), output
    assert "holding GPU" in last and "torch cannot use CUDA (torch " in last and "--device cpu" in last
    assert "Traceback" not in output and "Extension modules" not in output  # no crash dump from the actor
    report = report_of(small_slide, "no-cuda")
    assert report["status"] == "failed" and report["summary"]["tiles_segmented"] == 0
    assert not list(Path(small_slide, "labels", "no-cuda", "work").glob("candidates/*"))

    # --device cpu is the way to run on the CPUs of the same nodes.
    finished(segment(address, small_slide, *tiling, "--label-name", "no-cuda", "--device", "cpu"))
    report = report_of(small_slide, "no-cuda")
    assert report["status"] == "succeeded" and report["pool"]["each"] == {"CPU": report["pool"]["each"]["CPU"]}
    assert all(actor["device"] == "cpu" and not actor["gpus"] for actor in report["actors"])
