"""One cohort run against separate runs of the same slides: the wall time a cohort saves (issue 27).

``slides`` synthetic slides of ``size``² are segmented with the bundled model twice, on one running Ray
cluster (a head of this machine's CPUs, as a job's cluster is already up when jobs are submitted): once as
``slides`` separate ``cellsam-ray segment`` runs one after the other, each its own driver, actors and
weights, and once as one ``cellsam-ray segment GLOB`` cohort. Each is a subprocess joined to the cluster;
the labels of both are compared byte for byte. Numbers and machine: ``notes/pipeline.md``.

    python -m cellsam_ray.bench.cohort --slides 8 --size 1024
    python -m cellsam_ray.bench.cohort --slides 8 --size 4096 --gpus 4     # simulated GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cellsam_ray.bench.simulated import NO_AUTH, SIMULATED
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import label_chunk_files
from cellsam_ray.testing.cluster import RayNodes


def run(argv: list[str], address: str) -> float:
    """Wall seconds of one ``cellsam-ray`` command joined to the cluster at ``address``."""
    started = time.perf_counter()
    env = {**os.environ, **NO_AUTH, "RAY_ADDRESS": address}  # joins on loopback
    done = subprocess.run([sys.executable, "-m", "cellsam_ray.cli", *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - started


def measure(slides: int, size: int, folder: Path, cpus: int, at_once: int, gpus: int = 0,
            seconds_per_tile: float = 0.05) -> dict:
    """With ``gpus``, the node declares that many GPUs and ``bench.simulated.SimulatedGPU`` stands in for the
    model (``seconds_per_tile`` each, next to no CPU): what a cohort saves where the model is not on the
    CPUs the rest of the run needs."""
    urls = [str(folder / f"slide{i:02d}.ome.zarr") for i in range(slides)]
    for seed, url in enumerate(urls):
        write_synthetic_slide(url, size=(size, size), channels=2, ngff="0.5", seed=100 + seed, chunk=256)
    common = ["--nuclear", "DAPI", "--no-progress"]
    if gpus:
        common += ["--segmenter", SIMULATED, "--segmenter-option", f"seconds_per_tile={seconds_per_tile}",
                   "--tile", "256", "--halo", "32", "--chunk", "256", "--cpus-per-worker", "0.05"]
    with RayNodes(cpus=(cpus,), gpus=(gpus,), env=NO_AUTH) as cluster:
        address = f"127.0.0.1:{cluster.gcs_port}"
        separate = [run(["segment", url, *common, "--label-name", "separate"], address) for url in urls]
        cohort = run(["segment", str(folder / "slide*.ome.zarr"), *common, "--label-name", "cohort",
                      "--cohort-report", str(folder / "report"), "--slides-at-once", str(at_once)], address)
    same = all(label_chunk_files(url, "cohort") == label_chunk_files(url, "separate") for url in urls)
    return dict(slides=slides, size=size, cluster_cpus=cpus, slides_at_once=at_once,
                model="bundled" if not gpus else f"simulated: {gpus} GPUs, {seconds_per_tile} s per tile",
                separate_s=round(sum(separate), 1), separate_each_s=[round(s, 1) for s in separate],
                cohort_s=round(cohort, 1), cohort_share=round(cohort / sum(separate), 3), same_labels=same)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the cluster's one node")
    parser.add_argument("--slides-at-once", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=0, help="simulated GPUs instead of the bundled model on CPUs")
    parser.add_argument("--seconds-per-tile", type=float, default=0.05, help="a simulated GPU's time per tile")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as folder:
        print(json.dumps(measure(args.slides, args.size, Path(folder), args.cpus, args.slides_at_once, args.gpus,
                                 args.seconds_per_tile), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
