"""What a run costs besides the model, with the ground-truth segmenter standing in for it.

Three measurements (numbers and machines in ``notes/pipeline.md``):

- ``--sparse N --tissue T``: an N² slide in bioformats2raw's layout with tissue in one T² box (the rest
  never written): wall time and the driver's peak memory, which must follow the tissue, not N².
- ``--dense N ...``: N² synthetic slides full of cells (image chunks 256²): CPU core-seconds spent outside
  the segmenter, per tile (a 1024² window) and per 1024² of slide, by every process of the run (driver,
  Ray's own, actors, tasks). A GPU node must stay
  under this per tile to keep its GPU fed. Measured by sampling, twice a second, the CPU time of every
  process descended from this one (a process that ends between samples loses at most half a second).
- ``--stages``: the same stage functions called in this process, without Ray: CPU ms per tile of each
  step, to tell the functions' own cost from Ray's per-task cost (the outlines' two steps included: the
  cells whole in a core, and a home's rows with their outlines against its rows alone).
- ``--dense N --against TREE --repeat R``: R rounds of one run of this tree and one of another checkout
  (``git worktree add ../old <commit>``) on the same slide, each in a fresh process and cluster. The VM's
  speed drifts by tens of percent over minutes, so a change is measured only by runs side by side.

    python -m cellsam_ray.bench.merge --sparse 100000 --tissue 3000
    python -m cellsam_ray.bench.merge --dense 8192 16384 --repeat 3
    python -m cellsam_ray.bench.merge --stages   # the stage functions alone, in one process
    python -m cellsam_ray.bench.merge --dense 8192 --repeat 3 --against ../old   # this tree against another
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cellsam_ray.driver.api import ensure_ray, segment
from cellsam_ray.testing.oracle import GroundTruthSegmenter

ORACLE = "cellsam_ray.testing.oracle:GroundTruthSegmenter"
TIMED_ORACLE = "cellsam_ray.bench.merge:TimedOracle"
DENSE_ROLES = dict(nuclear=["DAPI"], whole_cell=["E-cadherin"])  # the dense slides' two channels (``dense_slide``)
_TICKS = os.sysconf("SC_CLK_TCK")


class TimedOracle(GroundTruthSegmenter):
    """The ground-truth segmenter, keeping the CPU time its calls take (of the calling thread, which does all
    of its work when the truth is a .npy) in ``<cpu_dir>/<pid>``: the report's model seconds are wall time,
    which a busy machine inflates, and subtracting them would undercount the rest."""

    def __init__(self, labels: str, *, cpu_dir: str) -> None:
        super().__init__(labels)
        self.file = Path(cpu_dir, str(os.getpid()))
        self.seconds = 0.0

    def segment(self, window, *, origin):
        start = time.thread_time()
        try:
            return super().segment(window, origin=origin)
        finally:
            self.seconds += time.thread_time() - start
            self.file.write_text(repr(self.seconds))


class TreeCPU:
    """Core-seconds used by this process and all its descendants while it runs (a sampling thread)."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.last, self.names, self._stop = every, {}, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        parents, used = {}, {}
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                fields = proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()
                parents[int(proc.name)] = int(fields[1])
                used[int(proc.name)] = (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
            except (OSError, IndexError, ValueError):
                continue
        me = os.getpid()
        for pid, seconds in used.items():
            p, hops = pid, 0
            while p not in (me, 0, 1) and p in parents and hops < 64:
                p, hops = parents[p], hops + 1
            if p == me:
                self.last[pid] = seconds
                try:  # what the process is (Ray names its workers by the task or actor they run)
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().split("/")[-1]
                except OSError:
                    name = ""
                if name and name != "ray::IDLE":
                    self.names.setdefault(pid, set()).add(name.split(" ")[0][:40])

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "TreeCPU":
        self._sample()
        self.start = dict(self.last)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(v - self.start.get(pid, 0.0) for pid, v in self.last.items())

    def by_process(self) -> dict[str, float]:
        """Core-seconds per kind of process (its last name seen), largest first."""
        kinds: dict[str, float] = {}
        for pid, v in self.last.items():
            names = sorted(self.names.get(pid, {"ray::IDLE (never seen busy)"}))
            actor = [n for n in names if n.startswith("ray::SegmentWorker")]
            name = "model actor" if actor else "+".join(names)
            kinds[name] = kinds.get(name, 0.0) + v - self.start.get(pid, 0.0)
        return {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def sparse(size: int, tissue: int, folder: Path) -> dict:
    from cellsam_ray.testing.ecosystem import write_sparse_bioformats2raw

    box = (size // 2, size // 3, tissue, tissue)
    root = folder / "sparse.ome.zarr"
    started = time.perf_counter()
    write_sparse_bioformats2raw(str(root), str(folder / "truth.ome.zarr"), size=(size, size), tissue=box, seed=7)
    written = time.perf_counter() - started
    ensure_ray()
    rss_before = _rss_mb()
    started = time.perf_counter()
    report = segment(dict(input=str(root), nuclear=["DAPI"], whole_cell=["CD45"], segmenter=ORACLE,
                          segmenter_options=dict(labels=str(folder / "truth.ome.zarr"))), progress=False)
    return dict(slide=f"{size}x{size}", tissue=f"{tissue}x{tissue}", fixture_s=round(written, 1),
                wall_s=round(time.perf_counter() - started, 1), driver_peak_rss_mb=_rss_mb(),
                driver_rss_before_mb=rss_before, tiles=report["summary"]["tiles"],
                tiles_segmented=report["summary"]["tiles_segmented"], cells=report["summary"]["cells"],
                stage_seconds=report["timings"], tasks=report["tasks"])


def dense_slide(folder: Path, size: int, name: str):
    """A ``size``² synthetic slide full of cells, and its truth as a plain .npy (memory-mapped), so the
    oracle reads it in its own thread, where its CPU time is counted; read through zarr, part of the work
    would run on zarr's I/O threads. Returns the slide's URL, its synth info and the truth's path."""
    from cellsam_ray.io.ngff import open_image
    from cellsam_ray.synth import write_synthetic_slide

    url = str(folder / f"{name}-{size}.ome.zarr")
    info = write_synthetic_slide(url, size=(size, size), channels=2, ngff="0.5", seed=3, chunk=256)
    truth = folder / f"{name}-truth-{size}.npy"
    np.save(truth, np.asarray(open_image(url).label("ground_truth").array(0)[:]))
    return url, info, truth


def dense(size: int, folder: Path, workers: int, repeat: int = 1, chunk: int = 256) -> dict:
    """``repeat`` runs on one slide (each writes its own label image, so none resumes another); the
    figures of each run and the median of the per-tile figure, since a shared VM's CPU times vary."""
    url, _, truth = dense_slide(folder, size, "dense")
    ensure_ray()
    runs = [_dense_run(url, truth, size, folder, f"bench{attempt}", workers, chunk) for attempt in range(repeat)]
    return dict(slide=f"{size}x{size}", label_chunk=chunk, tiles=runs[-1]["tiles"], cells=runs[-1]["cells"],
                cells_per_tile=round(runs[-1]["cells"] / runs[-1]["tiles"]),
                median_outside_core_s_per_tile=_median(runs), driver_peak_rss_mb=_rss_mb(), runs=runs)


def _dense_run(url: str, truth: Path, size: int, folder: Path, label: str, workers: int, chunk: int) -> dict:
    """One measured run of the pipeline on a dense slide whose cells are the label image ``truth``."""
    from cellsam_ray.spec import SegmentSpec

    timed = folder / f"segmenter-cpu-{label}"
    timed.mkdir()
    options = dict(labels=str(truth), cpu_dir=str(timed))
    spec = dict(input=url, **DENSE_ROLES, segmenter=TIMED_ORACLE, chunk=chunk,
                workers=workers, tissue_mask=False, label_name=label)
    if "segmenter_options" in SegmentSpec.model_fields:
        spec.update(segmenter_options=options)
    else:  # ``against`` a tree from before segmenter options, whose oracles read these variables instead
        os.environ.update(CELLSAM_RAY_ORACLE_LABELS=options["labels"], CELLSAM_RAY_BENCH_CPU_DIR=options["cpu_dir"])
    started = time.perf_counter()
    with TreeCPU() as cpu:
        report = segment(spec, progress=False)
    wall = time.perf_counter() - started
    segmenter_cpu = sum(float(p.read_text()) for p in timed.iterdir())
    outside = cpu.seconds - segmenter_cpu
    tiles = report["summary"]["tiles"]
    return dict(wall_s=round(wall, 1), cpu_core_s=round(cpu.seconds, 1), segmenter_cpu_s=round(segmenter_cpu, 1),
                segmenter_wall_s=round(report["model_seconds"], 1), tiles=tiles, cells=report["summary"]["cells"],
                outside_core_s_per_1024_area=round(outside / (size * size / 1024**2), 3),
                outside_core_s_per_tile=round(outside / tiles, 3), stage_seconds=report["timings"],
                tasks=report["tasks"], units=report.get("units"), core_s_by_process=cpu.by_process())


def _median(runs: list[dict]) -> float:
    per_tile = sorted(r["outside_core_s_per_tile"] for r in runs)
    return per_tile[len(per_tile) // 2]


def against(size: int, folder: Path, other: str, rounds: int, workers: int, chunk: int) -> dict:
    """This tree and the source tree ``other`` (another commit's checkout) on one slide, runs alternated
    ``rounds`` times, each in a fresh process and local cluster (as a user's ``segment``): the VM's speed
    drifts over minutes, so only runs side by side compare. The measuring code is this file's for both."""
    url, _, truth = dense_slide(folder, size, "dense")
    trees = {"this": str(Path(__file__).resolve().parents[2]), "other": str(Path(other).resolve())}
    runs: dict[str, list] = {name: [] for name in trees}
    for attempt in range(rounds):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            # The file run by path (runpy: sys.path unchanged), so this measuring code runs on the tree's package.
            argv = [__file__, "--one-run", url, str(truth), str(size), str(folder), f"{name}{attempt}", str(workers),
                    str(chunk)]
            code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({__file__!r}, run_name='__main__')"
            done = subprocess.run([sys.executable, "-c", code], env=env, cwd=folder, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"the run in {tree} failed: {done.stderr.strip().splitlines()[-1:]}")
            runs[name].append(json.loads(done.stdout.splitlines()[-1]))
    return dict(slide=f"{size}x{size}", label_chunk=chunk, trees=trees,
                median_outside_core_s_per_tile={name: _median(r) for name, r in runs.items()},
                per_tile={name: [r["outside_core_s_per_tile"] for r in rs] for name, rs in runs.items()},
                segmenter_cpu_s={name: [r["segmenter_cpu_s"] for r in rs] for name, rs in runs.items()}, runs=runs)


def stage_profile(folder: Path, size: int = 2304) -> dict:
    """CPU milliseconds per 1024² window of each stage function, in this process without Ray: what the
    functions cost before Ray's per-task cost (a dense ``size``² slide, tile 768 + halo 128)."""
    from cellsam_ray.driver import extent
    from cellsam_ray.driver.lifecycle import LabelRun
    from cellsam_ray.driver.windows import plan_run
    from cellsam_ray.merge.objects import CellSet
    from cellsam_ray.merge.rasterise import rasterise_core
    from cellsam_ray.merge.reconcile import global_offsets
    from cellsam_ray.pipeline import labels_out, source
    from cellsam_ray.pipeline.stages import finish_tiles, reconcile_tile, run_model, with_ids
    from cellsam_ray.spec import SegmentSpec
    from cellsam_ray.table import per_tile
    from cellsam_ray.table.outlines import outline_core

    url, info, truth = dense_slide(folder, size, "profile")
    plan = plan_run(SegmentSpec(input=url, nuclear=[info.channel_names[0]], whole_cell=[info.channel_names[1]],
                                segmenter=ORACLE, segmenter_options=dict(labels=str(truth)), tissue_mask=False,
                                label_name="profile", qc_images=False))
    LabelRun(plan).start()
    segmenter, ms = source.build_segmenter(plan), {}

    def timed(step: str, f, *args):
        start = time.process_time()
        out = f(*args)
        ms[step] = ms.get(step, 0.0) + (time.process_time() - start) * 1000
        return out

    grid = plan.grid
    for tile in plan.tiles:
        window = timed("segment: read and normalise the window", source.read_window, plan, tile)
        inferred = timed("segment: segmenter (ground truth)", run_model, segmenter, [tile], [window])
        (cells, _), = timed("segment: cleanup and candidates", finish_tiles, plan, [tile], inferred)
        plan.work.put("candidates", tile.key, timed("segment: candidate bytes", cells.to_bytes))
    homes, kept = extent.active_homes(plan), {}
    for home in homes:
        found = [timed("reconcile: decode 9 candidate files", CellSet.from_bytes,
                       plan.work.get("candidates", grid.tile_at(*rc).key)) for rc in grid.neighbourhood(*home)]
        kept[home] = timed("reconcile: keep or drop the candidates", reconcile_tile, home, found).kept
    offsets = dict(zip(homes, global_offsets([len(kept[h]) for h in homes])))
    cores = {}
    for home in homes:
        tile = grid.tile_at(*home)
        numbered = [with_ids(kept[rc], offsets[rc]) for rc in grid.neighbourhood(*home)]
        labels = timed("paint: paint the core", rasterise_core, tile, numbered)
        timed("paint: write the core", labels_out.write_core, plan, tile, labels)
        sums = timed("table: cell-table sums", per_tile.measure_tile, plan, tile, labels, CellSet.concat(numbered))
        outlines = timed("outlines: the core's whole cells, seam pieces", outline_core, labels,
                         (tile.core_y0, tile.core_x0), CellSet.concat(numbered))
        cores[home] = per_tile.CoreCells(*sums, outlines)
    layout, outline_layout = per_tile.layouts(plan)
    for home in homes:
        near = [[rc for rc in grid.neighbourhood(*home) if rc in cores]]
        timed("table: a home's rows", per_tile.rows_of_homes, layout, None, [home], near, cores)
        timed("outlines: a home's rows with outlines (less the line above: seam cells, encoding)",
              per_tile.rows_of_homes, layout, outline_layout, [home], near, cores)
    chunks = 0
    for level in labels_out.build_order(plan):
        for index in labels_out.chunk_indices(plan, level):
            timed("pyramid: build the chunks", labels_out.build_label_chunk, plan, level, index)
            chunks += 1
    n = len(plan.tiles)
    return dict(slide=f"{size}x{size}", tiles=n, pyramid_chunks=chunks,
                cpu_ms_per_tile={step: round(v / n, 1) for step, v in ms.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellsam_ray.bench.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparse", type=int, help="Side of a sparse slide (e.g. 100000).")
    parser.add_argument("--tissue", type=int, default=3000, help="Side of its tissue box (default 3000).")
    parser.add_argument("--dense", type=int, nargs="*", default=[], help="Sides of dense slides (e.g. 8192 16384).")
    parser.add_argument("--workers", type=int, default=2, help="Segmenter actors for the dense slides (default 2).")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per dense slide (the median is reported too).")
    parser.add_argument("--chunk", type=int, default=256, help="Label chunk for the dense slides (default 256).")
    parser.add_argument("--stages", action="store_true", help="CPU ms per tile of each stage function, without Ray.")
    parser.add_argument("--against", metavar="TREE", help="Alternate the dense runs with another source tree's.")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cellsam-ray-bench-merge-") as tmp:
        if args.sparse:
            rows.append(sparse(args.sparse, args.tissue, Path(tmp)))
        for size in args.dense:
            rows.append(against(size, Path(tmp), args.against, args.repeat, args.workers, args.chunk) if args.against
                        else dense(size, Path(tmp), args.workers, args.repeat, args.chunk))
        if args.stages:
            rows.append(stage_profile(Path(tmp)))
    print(json.dumps(dict(cpus=os.cpu_count(), results=rows), indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one-run"]:  # one run of ``against``, with the tree on PYTHONPATH
        url, truth, size, folder, label, workers, chunk = sys.argv[2:]
        ensure_ray()
        print(json.dumps(_dense_run(url, Path(truth), int(size), Path(folder), label, int(workers), int(chunk))))
        raise SystemExit(0)
    raise SystemExit(main())
