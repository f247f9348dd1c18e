"""The output does not change when the code is only rearranged: the bytes of every file a run writes under
``labels/<name>`` (label arrays of every level, metadata, the cell table, the QC images), for a few fixed
runs, hashed and held against ``tests/data/digests/outputs.json``.

The digests were stored before the package was re-laid out (notes/architecture.md); a change that is meant
to change the output regenerates them with ``CELLSAM_RAY_WRITE_DIGESTS=1`` and says why in its commit.
The run report is left out (it holds timings and versions), and so is the run id in the metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cellsam_ray import open_labels, segment
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.testing.checks import reference_dir

DIGESTS = Path(__file__).parent / "data" / "digests" / "outputs.json"
GOLDEN = reference_dir() / "golden"

RUNS = {
    # The ground truth as the segmenter: tiling, seams, ids, pyramid, table and QC, with the tissue mask.
    "oracle": dict(slide=dict(size=(512, 384), channels=3, seed=11, chunk=128),
                   spec=dict(nuclear=["DAPI"], whole_cell=["1"], tile=128, halo=40, band=8, chunk=64,
                             segmenter="ORACLE")),
    # The CellSAM network (the golden tiny checkpoint, both modes) through the whole pipeline.
    "cellsam-fast": dict(slide=dict(size=(384, 384), channels=3, seed=2, chunk=64),
                         spec=dict(nuclear=["DAPI"], whole_cell=["1"], tile=128, halo=32, band=8, chunk=64,
                                   device="cpu", mode="fast", weights=str(GOLDEN / "tiny_cellsam.pt"),
                                   config=str(GOLDEN / "tiny_config.json"))),
    "cellsam-reference": dict(slide=dict(size=(256, 256), channels=2, seed=5, chunk=64),
                              spec=dict(nuclear=["DAPI"], tile=128, halo=32, band=8, chunk=64, device="cpu",
                                        mode="reference", weights=str(GOLDEN / "tiny_cellsam.pt"),
                                        config=str(GOLDEN / "tiny_config.json"))),
}


def without_run_id(value):
    if isinstance(value, dict):
        return {k: without_run_id(v) for k, v in value.items() if k != "run_id"}
    return value


def file_digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json" or path.name in (".zattrs", ".zgroup", ".zarray"):
        data = json.dumps(without_run_id(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def output_digests(slide: str, name: str = "cells") -> dict[str, str]:
    folder = Path(slide, "labels", name)
    return {p.relative_to(folder).as_posix(): file_digest(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "report.json"}


def run(case: str, folder: Path) -> dict[str, str]:
    slide = str(folder / "slide.ome.zarr")
    write_synthetic_slide(slide, ngff="0.5", **RUNS[case]["slide"])
    spec = dict(RUNS[case]["spec"], input=slide)
    if spec.get("segmenter") == "ORACLE":
        spec.update(segmenter="cellsam_ray.testing.oracle:GroundTruthSegmenter", segmenter_options=dict(labels=slide))
    report = segment(spec, progress=False)
    assert open_labels(slide).array(0)[:].max() == report["summary"]["cells"]  # the face reads what it wrote
    return output_digests(slide)


@pytest.mark.parametrize("case", sorted(RUNS))
def test_a_run_writes_the_same_bytes_as_before(case, tmp_path, ray_cluster):
    digests = run(case, tmp_path)
    assert "cells.parquet" in digests and any(k.startswith("s0/c/") for k in digests)
    stored = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    if os.environ.get("CELLSAM_RAY_WRITE_DIGESTS") == "1":
        stored[case] = digests
        DIGESTS.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    assert digests == stored[case]
