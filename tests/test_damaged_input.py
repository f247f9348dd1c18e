"""A slide damaged in storage: a chunk of an ome-zarr-py slide overwritten with bytes no codec decodes.

Whichever stage meets it, the error names the array's chunk and says the input is damaged: while planning,
as one line and exit 2 before any model; while segmenting, as the failed tiles' error, in the run's line and
in its report. The damaged slide itself is never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cellsam_ray.cli import main
from cellsam_ray.io.ngff import open_image
from cellsam_ray.pipeline.pixels import read_channels
from cellsam_ray.testing.checks import file_checksums
from cellsam_ray.testing.ecosystem import disc_cells, fluorescence, write_with_ome_zarr_py

ORACLE = ["--segmenter", "cellsam_ray.testing.oracle:GroundTruthSegmenter"]
TILING = ["--tile", "128", "--halo", "32", "--chunk", "64", "--no-tissue-mask", "--no-cell-table", "--no-qc-images"]
DAMAGED = "s0/c/0/1/0"  # DAPI, rows 64..127, columns 0..63: in the windows of the tiles of column 0


def damaged_slide(folder: Path, version: str = "0.5") -> str:
    truth = disc_cells((256, 256), seed=7)
    url = write_with_ome_zarr_py(str(folder / "slide.ome.zarr"), fluorescence(truth, 2, np.uint16, seed=7),
                                 version=version, chunks=(1, 64, 64), channel_names=["DAPI", "CD45"],
                                 ground_truth=truth)
    chunk = DAMAGED if version == "0.5" else DAMAGED.replace("c/", "")
    (Path(url) / chunk).write_bytes(b"\x28\xb5\x2f\xfd" + b"not what was compressed" * 8)  # a zstd header, then junk
    return url


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_damaged_chunk_is_named_when_read(tmp_path, version):
    url = damaged_slide(tmp_path, version)
    image = open_image(url)
    expected = DAMAGED if version == "0.5" else DAMAGED.replace("c/", "")
    with pytest.raises(Exception, match=f"the input image is damaged: chunk {expected} of .* cannot be decoded"):
        read_channels(image.array(0), image.axes, {}, [0, 1], slice(0, 256), slice(0, 256))
    # What does not touch it reads as before: the other channel, the rows above.
    assert read_channels(image.array(0), image.axes, {}, [1], slice(0, 256), slice(0, 256)).shape == (1, 256, 256)
    assert read_channels(image.array(0), image.axes, {}, [0], slice(0, 64), slice(0, 256)).shape == (1, 64, 256)


def test_a_damaged_chunk_met_while_planning_is_one_line_before_any_model(tmp_path, monkeypatch, capsys):
    url = damaged_slide(tmp_path)
    before = file_checksums(url)

    def refuse() -> None:
        raise AssertionError("damaged input reached Ray: it must be refused while planning")

    monkeypatch.setattr("cellsam_ray.driver.api.ensure_ray", refuse)
    assert main(["segment", url, "--nuclear", "DAPI", *TILING, *ORACLE, "--segmenter-option", f"labels={url}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cellsam-ray: error: the input image is damaged: "), err
    assert f"chunk {DAMAGED} of file://{url} cannot be decoded (RuntimeError: Zstd" in err
    assert file_checksums(url) == before


def test_a_damaged_chunk_met_while_segmenting_names_it_in_the_failed_tiles(tmp_path, ray_cluster, monkeypatch,
                                                                          capsys):
    url = damaged_slide(tmp_path)
    before = file_checksums(url, skip="labels/cells")
    # Planning reads the slide's coarser level (as it does for any slide over 2048²): the model actors are
    # the first to read the damaged chunk of the finest one.
    monkeypatch.setattr("cellsam_ray.pipeline.plan.COARSE_PIXELS", 128 * 128)

    assert main(["segment", url, "--nuclear", "DAPI", *TILING, *ORACLE, "--segmenter-option", f"labels={url}"]) == 1

    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cellsam-ray: failed: 2 tile(s) failed on every attempt: tile r0000"), err
    assert f"the input image is damaged: chunk {DAMAGED} of file://{url} cannot be decoded" in err
    report = json.loads((Path(url) / "labels" / "cells" / "report.json").read_text())
    assert report["status"] == "failed"
    assert sorted((tile["row"], tile["col"]) for tile in report["errors"]) == [(0, 0), (1, 0)]
    assert all(f"damaged: chunk {DAMAGED}" in tile["error"] for tile in report["errors"])
    assert file_checksums(url, skip="labels/cells") == before
