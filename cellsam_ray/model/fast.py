"""Fast mode: the reference's answers for a batch of tiles, with mechanics built for an accelerator.

Reference mode (``reference.py``) follows the published code: one tile at a time, one mask-decoder call
per box, every mask upsampled to full tile resolution on the CPU. Here, for the same labels:

- preprocessing is tensor ops on the model's device (``preprocess``), the tiles of a batch go through
  both ViT encoders together with fused attention (``encoders``), and the box threshold is sklearn's
  2-means replayed in closed form on the host (``boxes``, ``two_means``);
- a chunk of boxes goes through the mask decoder in one call (``decoder``), chunks sized for the
  device; masks stay at low resolution and are painted on the device, only where they can reach
  (``paint``);
- the work is split in two phases. :func:`infer_tiles` is what needs the model (and a model lock, in a
  worker shared by threads); it leaves each tile's painted label image on its way to the host.
  :func:`finish_tile` is host work only (hole filling, small-object removal), so it can run while the
  next batch is on the device. :func:`segment_tiles_fast` does both.

On CUDA a tile costs a few host syncs: one per batch for the detector's scores, one per paint call
(``PAINT_BOXES`` boxes at a time) and one for the predicted IoUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import Tensor
from torch.profiler import record_function

from cellsam_ray.model import paint, precision
from cellsam_ray.model.boxes import BBOX_THRESHOLD, box_score_threshold, boxes_to_input_pixels
from cellsam_ray.model.cellfinder import detector_topk
from cellsam_ray.model.decoder import decode, prompt_positions
from cellsam_ray.model.encoders import vit_tokens
from cellsam_ray.model.network import CellSAM
from cellsam_ray.model.postprocess import MIN_SIZE, fill_holes_and_remove_small_masks
from cellsam_ray.model.preprocess import (
    detector_input,
    embedding_input,
    model_tensor,
    resize_to_model,
    sam_pixel_normalize,
)
from cellsam_ray.model.reference import IOU_THRESHOLD, MASK_THRESHOLD, TileSegmentation

TILE_BATCH = 4
"""Tiles per encoder batch."""
BOX_CHUNK = {"cpu": 4, "cuda": 128}
"""Boxes per mask-decoder call by device type. At v1.2 sizes a box's decoder activations take ~30 MB; on
a CPU larger chunks fall out of cache and get slower per box (4: 102 ms, 32: 140 ms on 1 Zen 4 core); on a
GPU small chunks are launch-bound (``python -m cellsam_ray.bench.gpu_check`` times 16..512)."""
PAINT_BOXES = {"cpu": 0, "cuda": 1024}
"""Boxes whose low-res masks (256 KB each) are kept to be painted together, one host sync per paint call;
0: paint every decoder chunk (a CPU has no sync to save, and keeps its cache)."""
HOST = "cellsam.host"
"""Profiler label of the host work on the model-locked path (``bench_host`` counts it as host time)."""


@dataclass
class PaintedTile:
    """What :func:`infer_tiles` leaves of a tile: the host work still to do is in :func:`finish_tile`."""

    labels: Tensor  # (H, W) int32 on the CPU, painted, before cleanup; complete once ``ready`` has passed
    ready: torch.cuda.Event | None  # the device-to-host copy of ``labels`` (None on a CPU)
    boxes: np.ndarray  # (N, 4) float32 painted boxes, tile pixels, paint order
    scores: np.ndarray  # (N,) float32
    ious: np.ndarray  # (N,) float32
    embedding: np.ndarray | None


def segment_tiles_fast(images: Sequence[np.ndarray], model: CellSAM, *, min_size: int = MIN_SIZE,
                       **options) -> list[TileSegmentation]:
    """Segment tiles like ``segment_tile_reference``, each (H, W) or (H, W, C ≤ 3); one result per tile.

    ``options`` are those of :func:`infer_tiles`.
    """
    return [finish_tile(tile, min_size) for tile in infer_tiles(images, model, **options)]


def segment_tile_fast(image: np.ndarray, model: CellSAM, **options) -> TileSegmentation:
    """One tile through :func:`segment_tiles_fast`."""
    return segment_tiles_fast([image], model, **options)[0]


def finish_tile(tile: PaintedTile, min_size: int = MIN_SIZE) -> TileSegmentation:
    """The host phase: wait for the tile's labels, fill holes, drop small objects (published rules)."""
    if tile.ready is not None:
        tile.ready.synchronize()
    cleaned = fill_holes_and_remove_small_masks(tile.labels.numpy(), min_size)
    return TileSegmentation(labels=cleaned.labels, boxes=tile.boxes, scores=tile.scores, ious=tile.ious,
                            embedding=tile.embedding, cell_rows=cleaned.sources - 1, cell_regions=cleaned.regions)


@torch.inference_mode()
def infer_tiles(
    images: Sequence[np.ndarray],
    model: CellSAM,
    *,
    normalize: bool = True,
    bbox_threshold: float = BBOX_THRESHOLD,
    iou_threshold: float = IOU_THRESHOLD,
    mask_threshold: float = MASK_THRESHOLD,
    device: str | torch.device = "cpu",
    tile_batch: int = TILE_BATCH,
    box_chunk: int | None = None,
    paint_boxes: int | None = None,
    static_chunks: bool = False,
    precision_name: str = "fp32",
    keep_embedding: bool = False,
    roles: bool = False,
) -> list[PaintedTile]:
    """The device phase for every tile, ``tile_batch`` tiles per encoder batch.

    ``model`` must already be on ``device``. ``box_chunk`` and ``paint_boxes`` default to ``BOX_CHUNK``
    and ``PAINT_BOXES`` for the device. ``static_chunks`` pads the last decoder chunk of a tile to the
    full chunk (repeating its last box, discarded), so every decoder call has one shape (for
    ``torch.compile`` or CUDA graphs). ``precision_name`` is one of ``precision.PRECISIONS``; the
    process's matmul flags are the caller's (``precision.configure``). ``keep_embedding`` copies each
    SAM image embedding to the host (4 MiB per tile at v1.2 sizes; nothing in the pipeline reads it).
    With ``roles`` each image is a pipeline window (nuclear[, whole-cell], H, W), already normalised:
    its channels go to CellSAM's channels 1 and 2 (``segmenter.cellsam_layout``) without a host copy in
    between.
    """
    device = torch.device(device)
    chunk = box_chunk or BOX_CHUNK.get(device.type, BOX_CHUNK["cuda"])
    options = dict(
        normalize=normalize, bbox_threshold=bbox_threshold, iou_threshold=iou_threshold,
        mask_threshold=mask_threshold, device=device, box_chunk=chunk,
        paint_boxes=paint_boxes if paint_boxes is not None else PAINT_BOXES.get(device.type, PAINT_BOXES["cuda"]),
        static_chunks=static_chunks, precision_name=precision_name, keep_embedding=keep_embedding, roles=roles,
    )
    tiles: list[PaintedTile] = []
    for start in range(0, len(images), tile_batch):
        tiles.extend(_infer_batch(images[start : start + tile_batch], model, **options))
    return tiles


def _infer_batch(
    images: Sequence[np.ndarray], model: CellSAM, *, normalize: bool, bbox_threshold: float, iou_threshold: float,
    mask_threshold: float, device: torch.device, box_chunk: int, paint_boxes: int, static_chunks: bool,
    precision_name: str, keep_embedding: bool, roles: bool,
) -> list[PaintedTile]:
    sam = model.sam
    size = sam.image_encoder.img_size
    resized, shapes = _upload_resized(images, roles=roles, normalize=normalize, size=size, device=device)
    unit = embedding_input(resized, adv_mode=model.adv_mode)
    detector = detector_input(resized, adv_mode=model.adv_mode)

    embeddings, logits, raw_boxes = encode(model, unit, detector, precision_name)
    scores, _, boxes = detector_topk(logits.float(), raw_boxes.float(), image_size=(size, size))
    detections = torch.cat((scores[..., None], boxes), dim=-1).cpu()  # the batch's sync: the 2-means runs here
    image_pe = prompt_positions(sam, device)

    results = []
    for index, (height, width) in enumerate(shapes):
        with record_function(HOST):
            tile_scores = detections[index, :, 0]
            # Scores come sorted (top-k), so the boxes above the threshold are a prefix: no mask to upload.
            kept = int((tile_scores > box_score_threshold(tile_scores, bbox_threshold)).sum())
        labels, painted, ious = _paint_tile(
            sam, embeddings[index : index + 1], image_pe, boxes[index, :kept], (height, width),
            iou_threshold=iou_threshold, mask_threshold=mask_threshold, box_chunk=box_chunk,
            paint_boxes=paint_boxes, static_chunks=static_chunks, precision_name=precision_name,
        )
        host_labels, ready = _to_host(labels.view(height, width))
        with record_function(HOST):
            painted = torch.from_numpy(painted)
            painted_boxes = boxes_to_input_pixels(detections[index, painted, 1:], height, width, size)
            results.append(PaintedTile(
                labels=host_labels,
                ready=ready,
                boxes=painted_boxes.numpy().reshape(-1, 4),
                scores=tile_scores[painted].numpy(),
                ious=ious,
                embedding=embeddings[index : index + 1].float().cpu().numpy() if keep_embedding else None,
            ))
    return results


def encode(model: CellSAM, unit: Tensor, detector: Tensor, precision_name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Both encoders and CellFinder's transformer: SAM image embeddings (B, C, g, g), class logits (B, Q, K)
    and (cx, cy, w, h) boxes (B, Q, 4)."""
    sam = model.sam
    with precision.autocast(precision_name, unit.device):
        embeddings = sam.image_encoder.neck(vit_tokens(sam.image_encoder, sam_pixel_normalize(unit)))
    finder = model.cellfinder.decode_head  # never bf16: it decides which boxes exist (``precision``)
    features = finder.input_proj[0](vit_tokens(finder.backbone.body, detector))
    logits, raw_boxes = finder.transformer(features)
    return embeddings, logits, raw_boxes


def _upload_resized(images: Sequence[np.ndarray], *, roles: bool, normalize: bool, size: int,
                    device: torch.device) -> tuple[Tensor, list[tuple[int, int]]]:
    """(B, 3, size, size) float32 on ``device`` and each tile's (H, W). Tiles of one shape are laid out in
    CellSAM's channel order straight into one (pinned) host buffer, copied and resized together."""
    shapes = [tuple(image.shape[1:] if roles else image.shape[:2]) for image in images]
    out = torch.empty((len(images), 3, size, size), device=device)
    by_shape: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(i)
    for shape, indices in by_shape.items():
        with record_function(HOST):
            batch = torch.empty((len(indices), 3, *shape), pin_memory=device.type == "cuda")
            for slot, i in zip(batch, indices):
                if roles:
                    if normalize or not 1 <= len(images[i]) <= 2:
                        raise ValueError("role windows are (1 or 2, H, W) and already normalised")
                    slot[0] = 0
                    slot[1 : 1 + len(images[i])] = torch.from_numpy(np.asarray(images[i], dtype=np.float32))
                    slot[1 + len(images[i]) :] = 0
                else:
                    slot.copy_(model_tensor(images[i], normalize=normalize))
        out[indices] = resize_to_model(batch.to(device, non_blocking=True), size)
    return out, shapes


def _to_host(labels: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
    """Start copying ``labels`` to (pinned) host memory; the event marks the copy's end."""
    if labels.device.type != "cuda":
        return labels, None
    host = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=True)
    host.copy_(labels, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _paint_tile(
    sam: Sam, embedding: Tensor, image_pe: Tensor, boxes: Tensor, shape: tuple[int, int], *,
    iou_threshold: float, mask_threshold: float, box_chunk: int, paint_boxes: int, static_chunks: bool,
    precision_name: str,
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Painted label image (flat, on the device, before cleanup), indices of the painted boxes and their
    predicted IoUs.

    A mask is painted with its rank among the surviving masks, in box order, and overlaps keep the
    highest rank: the reference's "later mask wins", independent of the order masks are painted in.
    """
    height, width = shape
    device = embedding.device
    labels = torch.zeros(height * width, dtype=torch.int32, device=device)
    if not len(boxes):
        return labels, np.zeros(0, dtype=np.int64), np.zeros(0, np.float32)
    low_size = 4 * embedding.shape[-1]
    size = sam.image_encoder.img_size
    rows = paint.axis(low_size, size, height, device)
    cols = paint.axis(low_size, size, width, device)
    logit_threshold = paint.reach_threshold(mask_threshold)
    survived = torch.zeros((), dtype=torch.int32, device=device)
    ious, pending = [], []
    for chunk in boxes.split(box_chunk):
        n = len(chunk)
        if static_chunks and n < box_chunk:
            chunk = torch.cat((chunk, chunk[-1:].expand(box_chunk - n, -1)))
        with precision.autocast(precision_name, device):
            low, iou = decode(sam, embedding, image_pe, chunk)
        low, iou = low[:n].float(), iou[:n].float()
        keep = iou >= iou_threshold
        rank = survived + torch.cumsum(keep, 0, dtype=torch.int32)
        survived = rank[-1]
        pending.append((low, (low > logit_threshold) & keep[:, None, None], rank))
        ious.append(iou)
        if sum(len(p[0]) for p in pending) >= paint_boxes:
            paint.paint(labels, *(torch.cat(parts) for parts in zip(*pending)), rows, cols, mask_threshold)
            pending = []
    if pending:
        paint.paint(labels, *(torch.cat(parts) for parts in zip(*pending)), rows, cols, mask_threshold)
    iou = torch.cat(ious).cpu().numpy()
    painted = np.flatnonzero(iou >= np.float32(iou_threshold))
    return labels, painted, iou[painted]
