"""A 40,000² whole slide, bioformats2raw layout, with tissue in one 1,500² box: after planning, the run's tasks
and the label chunks it writes follow the tissue, not the slide's area (issue 13, item 4)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from cellsam_ray.driver.api import segment
from cellsam_ray.io.ngff import open_image
from cellsam_ray.testing.checks import same_up_to_relabelling, validate_ome_zarr
from cellsam_ray.testing.ecosystem import write_sparse_bioformats2raw

ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"
SIZE = (40_000, 40_000)
TISSUE = (20_100, 12_300, 1_500, 1_500)  # y0, x0, h, w
TILE, HALO, CHUNK = 1024, 128, 256


def input_files(root: Path) -> dict[str, str]:
    """Every file of the slide but the labels this run adds (hashing files, not 6 GB of fill values)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "labels" not in p.relative_to(root).parts}


def chunk_files(level: Path) -> list[tuple[int, int]]:
    """(row, col) of every chunk file written in a label level (keys t/z/y/x with '/' between them)."""
    found = []
    for path in level.rglob("*"):
        parts = path.relative_to(level).parts
        if path.is_file() and all(re.fullmatch(r"\d+", p) for p in parts):
            found.append((int(parts[-2]), int(parts[-1])))
    return found


def test_a_sparse_whole_slide_costs_what_its_tissue_costs(tmp_path, ray_cluster):
    root = tmp_path / "slide.ome.zarr"
    series, truth = write_sparse_bioformats2raw(str(root), str(tmp_path / "truth.ome.zarr"), size=SIZE,
                                                tissue=TISSUE, seed=41)
    before = input_files(root)

    report = segment(dict(input=str(root), nuclear=["DAPI"], whole_cell=["CD45"], segmenter=ORACLE,
                          segmenter_options=dict(labels=str(tmp_path / "truth.ome.zarr")), tile=TILE, halo=HALO,
                          chunk=CHUNK, qc_images=False), progress=False)

    summary, tasks, units = report["summary"], report["tasks"], report["units"]
    assert summary["tiles"] == 40 * 40 and summary["tiles_segmented"] <= 9
    assert summary["cells"] == int(truth.max())
    # Homes next to a segmented tile, cores next to a home with cells: a few dozen of the 1,600.
    assert units["reconcile"] <= 25 and units["write"] <= units["reconcile"]
    assert all(tasks[stage] <= units[stage] for stage in ("reconcile", "write", "pyramid"))
    image = open_image(series)
    labels = image.label("cells")
    assert [lv.shape for lv in labels.levels] == [lv.shape[:1] + lv.shape[2:] for lv in image.levels]
    total_chunks = sum(np.prod([-(-n // c) for n, c in zip(lv.shape, lv.chunks)]) for lv in labels.levels)
    written = 0
    for k, level in enumerate(labels.levels):
        f = 2**k  # every label chunk written lies within a core's reach of the tissue, at every level
        y0, x0 = (TISSUE[0] - TILE) // f // CHUNK, (TISSUE[1] - TILE) // f // CHUNK
        y1, x1 = (TISSUE[0] + TISSUE[2] + TILE) // f // CHUNK, (TISSUE[1] + TISSUE[3] + TILE) // f // CHUNK
        chunks = chunk_files(Path(series, "labels", "cells", level.path))
        assert chunks and all(y0 <= r <= y1 and x0 <= c <= x1 for r, c in chunks), (level.path, chunks[:5])
        written += len(chunks)
    assert units["pyramid"] + units["write"] < 0.01 * total_chunks  # of ~32,000 chunks of the label pyramid
    assert written < 0.01 * total_chunks
    # The labels there are the truth, up to relabelling (and nothing around the tissue).
    y0, x0, h, w = TISSUE
    margin = 2 * CHUNK
    region = np.asarray(labels.array(0)[0, 0, y0 - margin : y0 + h + margin, x0 - margin : x0 + w + margin])
    expected = np.zeros_like(region)
    expected[margin : margin + h, margin : margin + w] = truth
    assert same_up_to_relabelling(region, expected)
    validate_ome_zarr(series)
    assert input_files(root) == before
