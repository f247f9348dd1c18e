"""Host work per tile around CellSAM's networks: ``python -m cellsam_ray.bench.model --host-profile --json``.

A GPU waits whenever the host is busy between its calls, so the host work on that path has to be small
next to the networks (on an H100 both encoders of a 1024² tile take a few ms). This profile measures
it on a CPU, with the networks' outputs replaced by fixed synthetic ones, so only host work is timed:

- encoders: zero embeddings and a detector that finds ``cells`` cells on a grid (score 0.9, the other
  queries 0.02); mask decoder: a disc of the box's size for each box, predicted IoU 0.9;
- everything else is the real fast path, the pipeline's, with CUDA's decoder chunk and paint size:
  ``fast.infer_tiles`` (preprocessing, top-k, box threshold, painting), then ``finish_tile``,
  ``cells_of``, the contract check, ``tile_candidates`` and the candidates' serialisation.

``host_ms_per_tile_critical`` is host time in ``infer_tiles``, the model-locked phase during which the
network cannot run: its wall time, less the time inside the outermost torch ops (on a GPU their work is
the device's; the profiler gives their spans) and inside the synthetic networks, plus ``LAUNCH_US`` per
outermost op for launching it. Torch ops on host tensors in that phase (laying windows out in pinned
memory, the detections once copied back) are marked ``fast.HOST`` and count whole as host time, and
preprocessing takes the accelerator's order statistics (a device sort; on a CPU NumPy would partition).
Every tensor made during the phase is kept alive until it ends (a dispatch mode, whose own calibrated
cost is taken off): freeing the CPU's stand-ins for device buffers (munmap of hundreds of MB, tens of
ms) is not host work a GPU's caching allocator would do.

``host_ms_per_tile_total`` adds the host phase (wall time), which runs outside the lock, overlapped with
the next batch. Both are medians over ``repeats`` runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from cellsam_ray.merge.candidates import tile_candidates
from cellsam_ray.model import fast, preprocess
from cellsam_ray.model.cellsam import cells_of
from cellsam_ray.model.config import CellSAMConfig
from cellsam_ray.model.network import build_cellsam
from cellsam_ray.segmenter import check_detections
from cellsam_ray.tiling import TileGrid

LAUNCH_US = 10.0
"""Host cost assumed per torch op on a GPU (dispatch and kernel launch; eager PyTorch: ~5-10 µs)."""
SYNTHETIC = "synthetic network"
SCORE, BACKGROUND_SCORE, IOU = 0.9, 0.02, 0.9


def host_profile(*, cells: int = 1000, window: int = 1024, tiles: int = 2, repeats: int = 5) -> dict:
    """The JSON record: critical and total host ms per tile, their parts and the conditions."""
    config = CellSAMConfig(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, encoder_global_attn_indexes=(0,),
                           prompt_embed_dim=32, decoder_mlp_dim=32, decoder_num_heads=2, iou_head_hidden_dim=32,
                           cellfinder_hidden_dim=32, cellfinder_nheads=2, cellfinder_dim_feedforward=32,
                           cellfinder_enc_layers=1, cellfinder_dec_layers=1)  # v1.2's input and 3,500 queries
    with torch.device("meta"):
        model = build_cellsam(config)  # sizes only: its networks are replaced
    model.drop_unused_sam()
    rng = np.random.default_rng(0)
    windows = [rng.uniform(0, 1, (2, window, window)).astype(np.float32) for _ in range(tiles)]
    grid = TileGrid(height=3 * window, width=3 * window, tile=window * 3 // 4, halo=window // 8)
    tile = grid.tile_at(1, 1)
    networks = _SyntheticNetworks(config, cells)
    mode_us = _KeepAlive.cost_us()
    critical, host, ops, found = [], [], [], []
    with networks:  # warm-up: caches, first allocations, the profiler's start-up
        _profiled_inference(model, windows, _KeepAlive())
    for _ in range(repeats):
        keep = _KeepAlive()
        with networks:
            wall, device_us, synthetic_us, count, painted = _profiled_inference(model, windows, keep)
        overhead_us = len(keep.kept) * mode_us
        del keep
        critical.append((wall * 1e6 - device_us - synthetic_us - overhead_us + count * LAUNCH_US) / 1e3 / tiles)
        ops.append(count / tiles)
        start = time.perf_counter()
        for one in painted:
            detections = check_detections(cells_of(fast.finish_tile(one)), "host profile")
            tile_candidates(detections, tile, grid, 16).to_bytes()
            found.append(len(detections))
        host.append((time.perf_counter() - start) * 1e3 / tiles)
    total = [c + h for c, h in zip(critical, host)]
    return dict(
        host_ms_per_tile_critical=round(statistics.median(critical), 2),
        host_ms_per_tile_total=round(statistics.median(total), 2),
        host_phase_ms_per_tile=round(statistics.median(host), 2),
        fastest=dict(critical=round(min(critical), 2), total=round(min(total), 2), host_phase=round(min(host), 2)),
        torch_ops_per_tile=round(statistics.median(ops), 1),
        launch_us_assumed=LAUNCH_US,
        keep_alive_us_per_op=round(mode_us, 2),
        cells_per_tile=round(float(np.mean(found)), 1),
        window=window,
        tiles_per_batch=tiles,
        repeats=repeats,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'unknown CPU'}",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )


def _profiled_inference(model, windows: list[np.ndarray], keep: _KeepAlive) -> tuple[float, float, float, int, list]:
    """(wall s, µs in outermost device-side torch ops, µs in the synthetic networks, outermost op count, results)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        with keep:
            painted = fast.infer_tiles(windows, model, roles=True, normalize=False, device="cpu",
                                       tile_batch=len(windows), box_chunk=fast.BOX_CHUNK["cuda"],
                                       paint_boxes=fast.PAINT_BOXES["cuda"])
        wall = time.perf_counter() - start
    device_us = synthetic_us = 0.0
    count = 0
    for event in prof.events():
        if event.name == SYNTHETIC and not _inside(event, lambda e: e.name == SYNTHETIC):
            synthetic_us += event.time_range.elapsed_us()
        elif event.name.startswith("aten::") and not _inside(
                event, lambda e: e.name.startswith("aten::") or e.name in (SYNTHETIC, fast.HOST)):
            device_us += event.time_range.elapsed_us()
            count += 1
    return wall, device_us, synthetic_us, count, painted


class _KeepAlive(TorchDispatchMode):
    """Keeps every tensor an op returns, so none is freed inside the timed phase."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.kept.append(out)
        return out

    @classmethod
    def cost_us(cls, n: int = 20000) -> float:
        """The mode's own µs per op: a tiny op timed with and without it (best of three)."""
        x = torch.zeros(1)
        times = []
        for keep in (None, cls()) * 3:
            start = time.perf_counter()
            if keep is None:
                for _ in range(n):
                    x.add(1)
            else:
                with keep:
                    for _ in range(n):
                        x.add(1)
            times.append(time.perf_counter() - start)
        return max(min(times[1::2]) - min(times[0::2]), 0.0) / n * 1e6


def _inside(event, predicate) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if predicate(parent):
            return True
        parent = parent.cpu_parent
    return False


class _SyntheticNetworks:
    """Fixed encoder and decoder outputs in place of ``fast.encode`` and ``fast.decode``, while entered."""

    def __init__(self, config: CellSAMConfig, cells: int) -> None:
        queries, size = config.cellfinder_num_queries, config.image_size
        side = int(np.ceil(np.sqrt(cells)))
        pitch = size / side
        y, x = np.divmod(np.arange(cells), side)
        boxes = np.full((queries, 4), 0.5, dtype=np.float32)
        boxes[:cells, 0], boxes[:cells, 1] = (x + 0.5) * pitch / size, (y + 0.5) * pitch / size
        boxes[:cells, 2:] = 0.8 * pitch / size
        scores = np.full((queries, config.cellfinder_num_classes), 1e-4, dtype=np.float32)
        scores[:, 0] = BACKGROUND_SCORE
        scores[:cells, 0] = SCORE - np.linspace(0, 0.05, cells)  # distinct, so the top-k order is fixed
        self.logits = torch.from_numpy(np.log(scores / (1 - scores)))
        self.boxes = torch.from_numpy(boxes)
        self.embedding = (config.prompt_embed_dim, config.embedding_grid)
        self.saved: tuple | None = None

    def __enter__(self) -> None:
        self.saved = (fast.encode, fast.decode, preprocess._nonzero_order_statistics)
        fast.encode, fast.decode = self.encode, self.decode
        preprocess._nonzero_order_statistics = preprocess._sorted_order_statistics  # what a GPU runs

    def __exit__(self, *exc) -> None:
        fast.encode, fast.decode, preprocess._nonzero_order_statistics = self.saved

    def encode(self, model, unit, detector, precision_name):
        with record_function(SYNTHETIC):
            b = len(unit)
            channels, grid = self.embedding
            return (torch.zeros(b, channels, grid, grid), self.logits.expand(b, -1, -1).clone(),
                    self.boxes.expand(b, -1, -1).clone())

    def decode(self, sam, embedding, image_pe, boxes):
        with record_function(SYNTHETIC):
            low = 4 * embedding.shape[-1]
            scale = low / sam.image_encoder.img_size
            centre = (boxes[:, :2] + boxes[:, 2:]) / 2 * scale
            radius = (boxes[:, 2] - boxes[:, 0]) / 2 * scale
            span = torch.arange(low, dtype=torch.float32) + 0.5
            distance = torch.hypot(span[None, :, None] - centre[:, 1, None, None],
                                   span[None, None, :] - centre[:, 0, None, None])
            return 4 * (radius[:, None, None] - distance), torch.full((len(boxes),), IOU)


def main(repeats: int = 5) -> None:
    print(json.dumps(host_profile(repeats=repeats)))
