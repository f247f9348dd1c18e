"""One prepared run of everything a GPU has to show: ``python -m cellsam_ray.bench.gpu_check [--device cuda]``.

Prints one JSON line (and writes it to ``--out``). It needs only torch, numpy, scipy, scikit-image,
segment-anything and pydantic: the GPU machines have no Ray, zarr or fsspec (a test runs it with those
blocked), and sklearn is not needed either. Sections, each timed and each failing on its own:

- ``golden``: the golden cases in fast mode per precision (fp32, tf32, bf16) against the golden labels
  and against fp32 on the CPU; how far the device's model inputs are from the golden ones (the resize
  is CUDA's own kernel there);
- ``synthetic``: windows of synthetic tissue through the bundled demo model per precision, against fp32;
- ``encoders``: both v1.2-size encoders and CellFinder's transformer (random weights), ms per tile per
  batch size and precision;
- ``decoder``: the v1.2 mask decoder, ms per box per chunk size and precision;
- ``end_to_end``: 1024² tiles with 1,000 forced boxes (v1.2, random weights): tiles/s of the model phase,
  ms of the host phase, tiles/s with the host phase in a second thread, host syncs per tile
  (``torch.cuda.set_sync_debug_mode``) and where they are, peak device memory;
- ``out_of_memory``: one forced out-of-memory (device memory capped) and its recovery, through the
  actors' own retry (``device.run_shrinking``).

``--device cpu --tiny`` is the dry run CI does: small sizes, one golden case, no sync counts; the
out-of-memory is then injected (a CPU has no device allocator to exhaust).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch


def _segment_anything_without_torchvision() -> None:
    """Register segment-anything's package module unexecuted where torchvision is missing (a GPU machine may
    lack it), so that its ``modeling`` subpackage, all CellSAM uses, imports on its own: the package's
    ``__init__`` imports its predictor and mask generator, which need torchvision. Done here, before the
    model's modules are imported, so that the product never has to."""
    try:
        present = importlib.util.find_spec("torchvision") is not None
    except ImportError:
        present = False
    if present or "segment_anything" in sys.modules:
        return
    spec = importlib.util.find_spec("segment_anything")
    if spec is not None:
        sys.modules["segment_anything"] = importlib.util.module_from_spec(spec)


_segment_anything_without_torchvision()

from cellsam_ray import device as device_errors  # noqa: E402 - after segment-anything is made importable
from cellsam_ray.errors import one_line
from cellsam_ray.evaluate import label_agreement, score_arrays
from cellsam_ray.model import bundled, fast, precision
from cellsam_ray.model.boxes import box_score_threshold
from cellsam_ray.model.cellfinder import detector_topk
from cellsam_ray.model.cellsam import CellSAMSegmenter, cells_of
from cellsam_ray.model.config import CellSAMConfig, load_config
from cellsam_ray.model.decoder import decode, prompt_positions
from cellsam_ray.model.network import build_cellsam
from cellsam_ray.model.preprocess import detector_input, embedding_input, model_tensor, resize_to_model
from cellsam_ray.model.weights import load_cellsam

FULL = dict(batches=(1, 2, 4, 8), chunks=(16, 32, 64, 128, 256, 512), boxes=1000, tile=1024, tiles=8, repeats=3,
            synthetic_side=2048, oom_tiles=8)
TINY = dict(batches=(1, 2), chunks=(2, 8), boxes=50, tile=128, tiles=2, repeats=1, synthetic_side=256, oom_tiles=4)
"""Sizes of a full run (v1.2 networks) and of the dry run (the golden tiny sizes at a 256-px input)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellsam_ray.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="small sizes: the dry run for CI")
    parser.add_argument("--golden", help="golden data folder (default: $CELLSAM_REFERENCE_DIR/golden, else "
                        "shared/reference/golden in or beside the checkout)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--only", help="comma-separated sections to run (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda, but no CUDA device is available here", file=sys.stderr)
        return 2
    sizes = TINY if args.tiny else FULL
    golden = _golden_dir(args.golden)
    sections = {
        "golden": lambda: golden_section(golden, device, args.tiny),
        "synthetic": lambda: synthetic_section(device, sizes, args.tiny),
        "encoders": lambda: encoders_section(device, sizes, args.tiny, golden),
        "decoder": lambda: decoder_section(device, sizes, args.tiny, golden),
        "end_to_end": lambda: end_to_end_section(device, sizes, args.tiny, golden),
        "out_of_memory": lambda: out_of_memory_section(device, sizes, args.tiny, golden),
    }
    chosen = args.only.split(",") if args.only else list(sections)
    report = dict(machine=_machine(device), tiny=args.tiny, sections={})
    for name in chosen:
        started = time.perf_counter()
        try:
            result = sections[name]()
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the others' numbers
            result = dict(error=one_line(err),
                          where=traceback.format_exc().strip().splitlines()[-3:])
        result["seconds"] = round(time.perf_counter() - started, 1)
        report["sections"][name] = result
        print(f"gpu_check: {name} done in {result['seconds']} s", file=sys.stderr, flush=True)
    line = json.dumps(report)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0 if not any("error" in r for r in report["sections"].values()) else 1


# --- sections ---------------------------------------------------------------------------------------------


def golden_section(golden: Path, device: torch.device, tiny: bool) -> dict:
    """Golden cases per precision: against the golden labels and against fp32 on the CPU."""
    cases = json.loads((golden / "cases.json").read_text())
    names = sorted(cases, key=lambda c: np.prod(cases[c]["shape"]))[:1] if tiny else sorted(cases)
    checkpoint, config = str(golden / "tiny_cellsam.pt"), str(golden / "tiny_config.json")
    images = {name: np.load(golden / f"{name}.input.npy") for name in names}

    def labels_of(model, name: str, **options) -> np.ndarray:
        return fast.segment_tile_fast(images[name], model, normalize=cases[name]["normalize"], **options).labels

    on_cpu: dict[str, np.ndarray] = {}
    if device.type != "cpu":  # on a CPU, the fp32 run below is the CPU's
        cpu_model = load_cellsam(checkpoint, config, inference=True)
        on_cpu = {name: labels_of(cpu_model, name) for name in names}
    out: dict = {"inputs": _input_differences(golden, names, cases, device)}
    for chosen in _precisions(device, tiny):
        model = load_cellsam(checkpoint, config, device=device, inference=True)
        rows = {}
        for name in names:
            labels = labels_of(model, name, device=device, precision_name=precision.configure(chosen, device))
            on_cpu.setdefault(name, labels)
            expected = np.load(golden / f"{name}.expected.npz")["labels"]
            agree, worst = label_agreement(labels, expected)
            rows[name] = dict(cells=int(labels.max()), golden_cells=int(expected.max()), agreement=round(agree, 5),
                              worst_iou=round(worst, 4), equal_to_golden=bool(np.array_equal(labels, expected)),
                              equal_to_cpu_fp32=bool(np.array_equal(labels, on_cpu[name])))
        out[chosen] = rows
    precision.configure("fp32", device)
    return out


def _input_differences(golden: Path, names: list[str], cases: dict, device: torch.device) -> dict:
    """Max |device − golden| of both model inputs, and how many elements differ at all."""
    out = {}
    for name in names:
        image = model_tensor(np.load(golden / f"{name}.input.npy"), normalize=cases[name]["normalize"])
        resized = resize_to_model(image[None].to(device))
        expected = np.load(golden / f"{name}.expected.npz")
        row = {}
        for key, actual in (("embedding", embedding_input(resized)), ("detector", detector_input(resized))):
            diff = np.abs(actual.cpu().numpy().astype(np.float64) - expected[f"model_input_{key}"])
            row[key] = dict(max_abs=float(diff.max()), differing=int(np.count_nonzero(diff)))
        out[name] = row
    return out


def synthetic_section(device: torch.device, sizes: dict, tiny: bool) -> dict:
    """Synthetic tissue windows through the bundled demo model per precision, against fp32 on this device."""
    from cellsam_ray.pipeline.intensity import channel_scales, combine_roles
    from cellsam_ray.synth import TissueModel

    side = sizes["synthetic_side"]
    region = TissueModel((side, side), seed=123, channels=2).render(0, side, 0, side)
    scaled = combine_roles(region.image, [[0], [1]], channel_scales(region.image))
    model = load_cellsam(str(bundled.WEIGHTS), str(bundled.CONFIG), device=device,
                         inference=True)
    window = model.config.image_size
    windows = [np.ascontiguousarray(scaled[:, y : y + window, x : x + window])
               for y in range(0, side, window) for x in range(0, side, window)]
    results = {}
    for chosen in _precisions(device, tiny):
        name = precision.configure(chosen, device)
        results[chosen] = [t.labels for t in fast.segment_tiles_fast(windows, model, normalize=False, roles=True,
                                                                      device=device, precision_name=name)]
    precision.configure("fp32", device)
    out = dict(windows=len(windows), window=window, cells_fp32=int(sum(label.max() for label in results["fp32"])))
    for chosen, labels in results.items():
        scores = [score_arrays(a, b) for a, b in zip(labels, results["fp32"])]
        matched = sum(s.true_positives for s in scores)
        out[chosen] = dict(cells=int(sum(label.max() for label in labels)),
                           equal_windows=sum(bool(np.array_equal(a, b)) for a, b in zip(labels, results["fp32"])),
                           f1_vs_fp32=round(2 * matched / max(sum(s.predicted + s.true for s in scores), 1), 4),
                           pixel_agreement=round(float(np.mean([label_agreement(a, b)[0]
                                                                for a, b in zip(labels, results["fp32"])])), 5))
    return out


def encoders_section(device: torch.device, sizes: dict, tiny: bool, golden: Path) -> dict:
    """ms per tile of both encoders and CellFinder's transformer, per batch size and precision."""
    model = _random_model(device, tiny, golden)
    size = model.config.image_size
    out = {}
    for chosen in _precisions(device, tiny):
        name = precision.configure(chosen, device)
        rows = {}
        for batch in sizes["batches"]:
            unit = torch.rand(batch, 3, size, size, device=device)

            def run() -> None:
                with torch.inference_mode():
                    fast.encode(model, unit, unit, name)

            try:
                ms = _median_ms(run, sizes["repeats"], device)
                rows[str(batch)] = round(ms / batch, 2)
            except Exception as err:  # noqa: BLE001 - a batch that does not fit is a result too
                if not device_errors.is_out_of_memory(err):
                    raise
                rows[str(batch)] = "out of memory"
            device_errors.release_device_memory()
        out[chosen] = rows
    precision.configure("fp32", device)
    return dict(ms_per_tile=out, peak_memory_gib=_peak_gib(device))


def decoder_section(device: torch.device, sizes: dict, tiny: bool, golden: Path) -> dict:
    """ms per box of the batched mask decoder, per chunk size and precision (one image embedding)."""
    sam = _random_model(device, tiny, golden).sam
    grid = sam.prompt_encoder.image_embedding_size[0]
    embedding = torch.randn(1, sam.prompt_encoder.embed_dim, grid, grid, device=device)
    image_pe = prompt_positions(sam, device)
    generator = torch.Generator().manual_seed(0)
    out = {}
    for chosen in _precisions(device, tiny):
        name = precision.configure(chosen, device)
        rows = {}
        for chunk in sizes["chunks"]:
            corner = torch.rand(chunk, 2, generator=generator) * (sam.image_encoder.img_size - 64)
            boxes = torch.cat((corner, corner + 16 + torch.rand(chunk, 2, generator=generator) * 48), 1).to(device)

            def run() -> None:
                with torch.inference_mode(), precision.autocast(name, device):
                    decode(sam, embedding, image_pe, boxes)

            rows[str(chunk)] = round(_median_ms(run, sizes["repeats"], device) / chunk, 4)
        out[chosen] = rows
    precision.configure("fp32", device)
    return dict(ms_per_box=out, peak_memory_gib=_peak_gib(device))


def end_to_end_section(device: torch.device, sizes: dict, tiny: bool, golden: Path) -> dict:
    """Tiles with forced boxes through the fast path: model phase, host phase, both overlapped, syncs."""
    model = _random_model(device, tiny, golden)
    rng = np.random.default_rng(0)
    window = rng.uniform(0, 1, (2, sizes["tile"], sizes["tile"])).astype(np.float32)
    windows = [window] * sizes["tiles"]
    threshold = _forcing_threshold(model, window, sizes["boxes"], device)
    options = dict(normalize=False, roles=True, device=device, bbox_threshold=threshold, iou_threshold=0.0)
    out = dict(tile=sizes["tile"], boxes_per_tile=sizes["boxes"], tiles=len(windows))
    for chosen in _precisions(device, tiny, ("tf32", "bf16")):
        name = precision.configure(chosen, device)
        fast.infer_tiles(windows[:1], model, precision_name=name, **options)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        painted = fast.infer_tiles(windows, model, precision_name=name, **options)
        _synchronize(device)
        model_s = time.perf_counter() - start
        start = time.perf_counter()
        cells = [len(cells_of(fast.finish_tile(tile))["masks"]) for tile in painted]
        host_s = time.perf_counter() - start
        out[chosen] = dict(
            model_tiles_per_s=round(len(windows) / model_s, 2),
            host_ms_per_tile=round(host_s * 1e3 / len(windows), 1),
            overlapped_tiles_per_s=round(_overlapped_rate(model, windows, name, options), 2),
            cells_per_tile=round(float(np.mean(cells)), 1),
            peak_memory_gib=_peak_gib(device),
            syncs=_syncs(model, windows, name, options) if device.type == "cuda" else None,
        )
    precision.configure("fp32", device)
    return out


def out_of_memory_section(device: torch.device, sizes: dict, tiny: bool, golden: Path) -> dict:
    """A batch too large for a capped device memory, recovered by the actors' retry: batch and chunk shrink."""
    model = _random_model(device, tiny, golden)
    segmenter = CellSAMSegmenter(model, device=str(device), batch_size=sizes["oom_tiles"], precision_name="fp32")
    segmenter.box_chunk = 512 if not tiny else 8
    side = sizes["tile"]
    windows = [np.random.default_rng(i).uniform(0, 1, (2, side, side)).astype(np.float32)
               for i in range(sizes["oom_tiles"])]
    origins = [(0, 0)] * len(windows)
    segmenter.bbox_threshold = _forcing_threshold(model, windows[0], sizes["boxes"], device)
    attempts: list[tuple[int, int]] = []
    injected = device.type != "cuda"

    def run(part):
        attempts.append((len(part), segmenter.box_chunk))
        if injected and len(part) > 2:  # a CPU cannot run out of device memory: raise what CUDA would
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected: no device allocator on a CPU)")
        return [finish() for finish in segmenter.infer_batch(list(part), origins=origins[: len(part)])]

    capped = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        capped = (torch.cuda.memory_allocated(device) + (6 << 30)) / total  # room for ~one tile at chunk 512
        torch.cuda.set_per_process_memory_fraction(min(capped, 1.0), device)
    try:
        done, limit = device_errors.run_shrinking(windows, len(windows), run, segmenter.on_out_of_memory)
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
    return dict(injected=injected, memory_fraction=None if capped is None else round(capped, 3),
                attempts=attempts, out_of_memory_seen=len(attempts) > 1, final_batch=limit,
                final_box_chunk=segmenter.box_chunk, recovered=sum(len(part) for part, _ in done) == len(windows))


# --- helpers ----------------------------------------------------------------------------------------------


def _precisions(device: torch.device, tiny: bool, wanted: tuple[str, ...] = precision.PRECISIONS) -> list[str]:
    """The ``wanted`` precisions worth running here: tf32 only on CUDA (elsewhere it is fp32)."""
    return [p for p in wanted if device.type == "cuda" or p != "tf32"]


def _random_model(device: torch.device, tiny: bool, golden: Path):
    """v1.2 sizes with random weights (``--tiny``: the golden tiny sizes at a 256-px input), on the device."""
    if tiny:
        config = load_config(str(golden / "tiny_config.json")).model_copy(update={"image_size": 256})
    else:
        config = CellSAMConfig.preset("v1.2")
    torch.manual_seed(0)
    with torch.device(device):
        model = build_cellsam(config)
    return model.drop_unused_sam()


@torch.inference_mode()
def _forcing_threshold(model, window: np.ndarray, boxes: int, device: torch.device) -> float:
    """A ``bbox_threshold`` that lets ``boxes`` detections of ``window`` through (random weights find none)."""
    size = model.config.image_size
    planes = torch.zeros((1, 3, *window.shape[1:]))
    planes[0, 1:] = torch.from_numpy(window)  # CellSAM's channels (blank, nuclear, whole-cell)
    resized = resize_to_model(planes.to(device), size)
    _, logits, raw = fast.encode(model, embedding_input(resized), detector_input(resized), "fp32")
    scores = detector_topk(logits.float(), raw.float(), image_size=(size, size))[0][0].cpu()
    boxes = min(boxes, len(scores) - 1)
    target = float(scores[boxes - 1] + scores[boxes]) / 2
    return (target - box_score_threshold(scores, 0.0)) / 0.66


def _overlapped_rate(model, windows: list, name: str, options: dict) -> float:
    """Tiles/s with the host phase of each batch in a second thread while the next batch is on the model."""
    batch = 4
    start = time.perf_counter()
    finisher: threading.Thread | None = None
    for i in range(0, len(windows), batch):
        painted = fast.infer_tiles(windows[i : i + batch], model, precision_name=name, **options)
        if finisher:
            finisher.join()
        finisher = threading.Thread(target=lambda p=painted: [cells_of(fast.finish_tile(t)) for t in p])
        finisher.start()
    finisher.join()
    return len(windows) / (time.perf_counter() - start)


def _syncs(model, windows: list, name: str, options: dict) -> dict:
    """Host syncs of the model phase per tile, as ``set_sync_debug_mode`` reports them, and where."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fast.infer_tiles(windows, model, precision_name=name, **options)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    places = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return dict(per_tile=round(len(syncs) / len(windows), 2), where=dict(places.most_common(10)))


def _median_ms(run, repeats: int, device: torch.device) -> float:
    run()  # warm-up (kernel selection, allocator)
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(device=str(device), gpu=gpu, torch=torch.__version__, python=platform.python_version(),
                cpus=os.cpu_count(), threads=torch.get_num_threads(), platform=platform.platform())


def _golden_dir(given: str | None) -> Path:
    """The golden data: ``--golden``, ``$CELLSAM_REFERENCE_DIR/golden``, or shared/reference/golden in or
    beside the checkout (the GPU machine gets ``shared/`` inside the working tree)."""
    root = Path(__file__).resolve().parents[2]
    candidates = [Path(given)] if given else []
    if os.environ.get("CELLSAM_REFERENCE_DIR"):
        candidates.append(Path(os.environ["CELLSAM_REFERENCE_DIR"]) / "golden")
    candidates += [root / "shared" / "reference" / "golden", root.parent / "shared" / "reference" / "golden"]
    for folder in candidates:
        if (folder / "cases.json").is_file():
            return folder
    raise SystemExit(f"gpu_check: error: no golden data in {', '.join(map(str, candidates))}; give --golden DIR")


if __name__ == "__main__":
    sys.exit(main())
