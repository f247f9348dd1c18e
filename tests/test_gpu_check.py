"""The prepared GPU check dry-runs on a CPU with only its allowed dependencies importable.

The GPU machines have torch, numpy, scipy, scikit-image, segment-anything and pydantic, but no Ray, zarr,
fsspec, sklearn or torchvision: the check runs here in a child process where importing any of those
fails, so an import that slips into its graph fails this test, not the one GPU run.
"""

from __future__ import annotations

import json
import subprocess
import sys

BLOCKED = ("ray", "zarr", "fsspec", "s3fs", "sklearn", "torchvision", "dask", "ome_zarr", "pandas", "pyarrow")
RUNNER = f"""
import importlib.abc, runpy, sys

class Absent(importlib.abc.MetaPathFinder):  # the usual finders, except that the blocked packages are absent

    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

sys.meta_path[:] = [Absent(list(sys.meta_path))]
sys.argv = ["gpu_check", "--device", "cpu", "--tiny"]
runpy.run_module("cellsam_ray.bench.gpu_check", run_name="__main__")
"""


def test_gpu_check_dry_runs_without_ray_zarr_fsspec_sklearn_or_torchvision():
    done = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    sections = report["sections"]
    assert set(sections) == {"golden", "synthetic", "encoders", "decoder", "end_to_end", "out_of_memory"}
    assert not [name for name, section in sections.items() if "error" in section]
    (case,) = sections["golden"]["fp32"].values()
    assert case["equal_to_golden"] and case["equal_to_cpu_fp32"]  # fp32 on a CPU is the golden answer exactly
    assert {"fp32", "bf16"} <= set(sections["synthetic"]) and sections["synthetic"]["fp32"]["f1_vs_fp32"] == 1.0
    assert all(isinstance(ms, float) and ms > 0 for ms in sections["decoder"]["ms_per_box"]["fp32"].values())
    oom = sections["out_of_memory"]
    assert oom["injected"] and oom["out_of_memory_seen"] and oom["recovered"]
    assert oom["final_batch"] < oom["attempts"][0][0] and oom["final_box_chunk"] < oom["attempts"][0][1]
