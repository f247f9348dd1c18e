"""Fast mode: the reference answers for a batch of tiles, with different mechanics.

Reference mode (``reference.py``) follows the published code: one tile at a time, one mask-decoder call
per box, every mask upsampled to full tile resolution on the CPU. Here, for the same labels:

- tiles go through both ViT encoders as a batch, and the ViT attention runs as one fused
  scaled-dot-product attention: SAM's decomposed relative-position bias, ``q·R_h[y] + q·R_w[x]``, is
  folded into the attention logits by appending those terms to the queries and one-hot (y, x) codes
  to the keys, so the (L, L) bias is never built;
- all boxes of a tile go through the mask decoder in one call per chunk, with the image embedding
  broadcast rather than repeated per box;
- masks stay at low resolution (256²); only the pixels a mask can reach are upsampled, with the
  source indices and weights PyTorch's bilinear kernel uses (256 → 1024 → tile size), so they agree
  with the reference to float rounding;
- painting is one scatter-max per group of masks on the device, and the host sees one small transfer
  per chunk of boxes instead of a sync per box.

Preprocessing, the box threshold and the cleanup are the reference's own functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos, window_partition, window_unpartition
from torch import Tensor

from cellsam_ray.model.boxes import BBOX_THRESHOLD, boxes_to_input_pixels, confident_boxes
from cellsam_ray.model.cellfinder import detector_topk
from cellsam_ray.model.network import CellSAM
from cellsam_ray.model.postprocess import MIN_SIZE, fill_holes_and_remove_small_masks
from cellsam_ray.model.preprocess import (
    detector_input,
    embedding_input,
    format_image_shape,
    normalize_image,
    resize_to_model,
    sam_pixel_normalize,
)
from cellsam_ray.model.reference import IOU_THRESHOLD, MASK_THRESHOLD, TileSegmentation

TILE_BATCH = 4
"""Tiles per encoder batch."""
BOX_CHUNK = 64
"""Boxes per mask-decoder call; bounds the decoder's per-box activations (tens of MB each for v1.2)."""
WINDOW_BUDGET = 1 << 21
"""Upsampled pixels computed at once when pasting; masks are grouped by window size to stay under it."""
_THRESHOLD_MARGIN = 1e-3
"""Low-res logits this far below the mask threshold still count as reachable: bilinear values are convex
combinations of their taps, so no pixel beyond a mask's reachable taps can pass the threshold, and
the margin covers float rounding in that argument."""


@torch.inference_mode()
def segment_tiles_fast(
    images: Sequence[np.ndarray],
    model: CellSAM,
    *,
    normalize: bool = True,
    bbox_threshold: float = BBOX_THRESHOLD,
    iou_threshold: float = IOU_THRESHOLD,
    mask_threshold: float = MASK_THRESHOLD,
    min_size: int = MIN_SIZE,
    device: str | torch.device = "cpu",
    tile_batch: int = TILE_BATCH,
    box_chunk: int = BOX_CHUNK,
    bf16: bool = False,
) -> list[TileSegmentation]:
    """Segment tiles like ``segment_tile_reference``, each (H, W) or (H, W, C ≤ 3); one result per tile.

    ``model`` must already be on ``device``. ``bf16`` runs the networks under bfloat16 autocast (CUDA
    only; its answers differ slightly from the float32 reference, whose thresholds it keeps).
    """
    results: list[TileSegmentation] = []
    for start in range(0, len(images), tile_batch):
        batch = images[start : start + tile_batch]
        results.extend(
            _segment_batch(
                batch, model, normalize=normalize, bbox_threshold=bbox_threshold, iou_threshold=iou_threshold,
                mask_threshold=mask_threshold, min_size=min_size, device=torch.device(device),
                box_chunk=box_chunk, bf16=bf16,
            )
        )
    return results


def segment_tile_fast(image: np.ndarray, model: CellSAM, **options) -> TileSegmentation:
    """One tile through :func:`segment_tiles_fast`."""
    return segment_tiles_fast([image], model, **options)[0]


def _segment_batch(
    images: Sequence[np.ndarray], model: CellSAM, *, normalize: bool, bbox_threshold: float, iou_threshold: float,
    mask_threshold: float, min_size: int, device: torch.device, box_chunk: int, bf16: bool,
) -> list[TileSegmentation]:
    sam = model.sam
    size = sam.image_encoder.img_size
    formatted = [format_image_shape(image) for image in images]
    if normalize:
        formatted = [normalize_image(image) for image in formatted]
    resized = torch.cat([resize_to_model(image, size) for image in formatted])
    unit = embedding_input(resized, adv_mode=model.adv_mode)
    detector = detector_input(resized, adv_mode=model.adv_mode)

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        embeddings = sam.image_encoder.neck(_vit_tokens(sam.image_encoder, sam_pixel_normalize(unit).to(device)))
        finder = model.cellfinder.decode_head
        features = finder.input_proj[0](_vit_tokens(finder.backbone.body, detector.to(device)))
        logits, raw_boxes = finder.transformer(features)
    scores, _, boxes = detector_topk(logits.float(), raw_boxes.float(), image_size=(size, size))
    scores, boxes = scores.cpu(), boxes.cpu()  # one transfer per batch: the 2-means threshold runs in sklearn

    image_pe = sam.prompt_encoder.get_dense_pe()
    results = []
    for index, image in enumerate(formatted):
        tile_scores, tile_boxes = confident_boxes(scores[index], boxes[index], bbox_threshold)
        height, width = image.shape[:2]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            labels, painted, ious = _paint_tile(
                sam, embeddings[index : index + 1], image_pe, tile_boxes.to(device), (height, width),
                iou_threshold=iou_threshold, mask_threshold=mask_threshold, box_chunk=box_chunk,
            )
        results.append(
            TileSegmentation(
                labels=fill_holes_and_remove_small_masks(labels, min_size),
                boxes=boxes_to_input_pixels(tile_boxes[painted], height, width, size).numpy().reshape(-1, 4),
                scores=tile_scores[painted].numpy(),
                ious=ious,
                embedding=embeddings[index : index + 1].float().cpu().numpy(),
            )
        )
    return results


# --- encoders ---------------------------------------------------------------------------------------------


def _vit_tokens(vit: torch.nn.Module, images: Tensor) -> Tensor:
    """(B, C, h, w) features of SAM's ViT trunk (before any neck), with fused attention.

    ``vit`` is an ``ImageEncoderViT`` or CellFinder's ``ViTTrunk``: anything with ``patch_embed``,
    ``pos_embed`` and ``blocks``. Block structure as segment-anything's ``Block.forward``.
    """
    x = vit.patch_embed(images)
    if vit.pos_embed is not None:
        x = x + vit.pos_embed
    for block in vit.blocks:
        x = _block(block, x)
    return x.permute(0, 3, 1, 2)


def _block(block: Block, x: Tensor) -> Tensor:
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1:3]
        windows, padded = window_partition(x, block.window_size)
        x = window_unpartition(_attention(block.attn, windows), block.window_size, padded, (height, width))
    else:
        x = _attention(block.attn, x)
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


def _attention(attn: Attention, x: Tensor) -> Tensor:
    """SAM's ViT attention as one ``scaled_dot_product_attention``, relative positions folded in.

    SAM adds ``q·R_h[y_q, y_k] + q·R_w[x_q, x_k]`` (unscaled q) to the scaled logits. Appending those
    two vectors to each scaled query, and the one-hot codes of (y_k, x_k) to each key, makes the plain
    dot product equal SAM's logits, so the fused kernel never materialises the (L, L) bias.
    """
    b, h, w, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        grid_q = q.unflatten(2, (h, w))
        rel_h = torch.einsum("bnyxc,ykc->bnyxk", grid_q, get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype))
        rel_w = torch.einsum("bnyxc,xkc->bnyxk", grid_q, get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype))
        codes = torch.cat(
            (
                torch.eye(h, dtype=k.dtype, device=k.device).repeat_interleave(w, dim=0),
                torch.eye(w, dtype=k.dtype, device=k.device).repeat(h, 1),
            ),
            dim=1,
        )
        q = torch.cat((q * attn.scale, rel_h.flatten(2, 3), rel_w.flatten(2, 3)), dim=-1)
        k = torch.cat((k, codes.expand(*k.shape[:2], -1, -1)), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return attn.proj(out.transpose(1, 2).reshape(b, h, w, -1))


# --- masks ------------------------------------------------------------------------------------------------


def _decode(sam: Sam, embedding: Tensor, image_pe: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Single-mask low-res logits (n, s, s) and predicted IoU (n,) for n boxes (model frame, xyxy).

    segment-anything's ``MaskDecoder.predict_masks`` with the image embedding and its positional
    encoding broadcast over boxes instead of repeated, and only mask token 0 (the single-mask output)
    turned into a mask. Without a mask prompt the dense prompt is the same for every box.
    """
    decoder = sam.mask_decoder
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    n = boxes.shape[0]
    tokens = torch.cat((decoder.iou_token.weight, decoder.mask_tokens.weight), dim=0).expand(n, -1, -1)
    tokens = torch.cat((tokens.to(sparse.dtype), sparse), dim=1)
    channels, height, width = embedding.shape[1:]
    hidden, keys = decoder.transformer((embedding + dense[:1]).expand(n, -1, -1, -1), image_pe, tokens)
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(n, channels, height, width))
    hyper = decoder.output_hypernetworks_mlps[0](hidden[:, 1])
    masks = (hyper[:, None] @ upscaled.flatten(2)).view(n, *upscaled.shape[2:])
    return masks, decoder.iou_prediction_head(hidden[:, 0])[:, 0]


@dataclass(frozen=True)
class _Taps:
    """Bilinear taps along one axis: source indices ``i0``, ``i1`` and their weights ``w0``, ``w1``."""

    i0: Tensor
    i1: Tensor
    w0: Tensor
    w1: Tensor

    def at(self, index: Tensor) -> _Taps:
        return _Taps(self.i0[index], self.i1[index], self.w0[index], self.w1[index])


def _axis_taps(in_size: int, out_size: int, device: torch.device) -> _Taps:
    """Taps of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis, as PyTorch builds them.

    The source position is ``scale·(j + ½) − ½`` with ``scale = in/out`` in float32, evaluated with a single
    rounding (the kernel's fused multiply-add), clamped at 0; the upper tap is clamped at the last pixel.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    centres = torch.arange(out_size, dtype=torch.float32) + 0.5
    source = (scale.double() * centres.double() - 0.5).float().clamp(min=0)
    i0 = source.floor().long().clamp(max=in_size - 1)
    w1 = (source - i0).clamp(0, 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return _Taps(i0.to(device), i1.to(device), (1 - w1).to(device), w1.to(device))


def _bilinear(sample: Callable[[Tensor, Tensor], Tensor], rows: _Taps, cols: _Taps) -> Tensor:
    """Interpolate ``sample(rows, cols)`` in the kernel's order: along columns, then along rows."""
    top = sample(rows.i0, cols.i0) * cols.w0 + sample(rows.i0, cols.i1) * cols.w1
    bottom = sample(rows.i1, cols.i0) * cols.w0 + sample(rows.i1, cols.i1) * cols.w1
    return top * rows.w0 + bottom * rows.w1


@dataclass(frozen=True)
class _Upsampling:
    """The reference's two resizes along one axis (low-res → model frame → tile) and each tile pixel's reach."""

    to_model: _Taps  # model-frame pixel -> low-res taps
    to_tile: _Taps  # tile pixel -> model-frame taps
    first: Tensor  # lowest low-res index a tile pixel reads (non-decreasing)
    last: Tensor  # highest low-res index a tile pixel reads (non-decreasing)

    @classmethod
    def build(cls, low: int, model: int, tile: int, device: torch.device) -> _Upsampling:
        to_model, to_tile = _axis_taps(low, model, device), _axis_taps(model, tile, device)
        return cls(to_model, to_tile, to_model.i0[to_tile.i0].contiguous(), to_model.i1[to_tile.i1].contiguous())

    def window(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """[start, stop) of the tile pixels that read any low-res index in [lo, hi] (per mask)."""
        return torch.searchsorted(self.last, lo), torch.searchsorted(self.first, hi, right=True)


def _paint_tile(
    sam: Sam, embedding: Tensor, image_pe: Tensor, boxes: Tensor, shape: tuple[int, int], *,
    iou_threshold: float, mask_threshold: float, box_chunk: int,
) -> tuple[np.ndarray, Tensor, np.ndarray]:
    """Painted label image (before cleanup), indices of the painted boxes and their predicted IoUs.

    A mask is painted with its rank among the surviving masks, in box order, and overlaps keep the
    highest rank: the reference's "later mask wins", independent of the order groups are painted in.
    """
    height, width = shape
    device = embedding.device
    labels = torch.zeros(height * width, dtype=torch.int32, device=device)
    if not len(boxes):
        return labels.view(height, width).cpu().numpy(), torch.zeros(0, dtype=torch.long), np.zeros(0, np.float32)
    size = sam.image_encoder.img_size
    low_size = 4 * embedding.shape[-1]
    rows = _Upsampling.build(low_size, size, height, device)
    cols = _Upsampling.build(low_size, size, width, device)
    logit_threshold = math.log(mask_threshold / (1 - mask_threshold)) - _THRESHOLD_MARGIN
    survived = torch.zeros((), dtype=torch.int32, device=device)
    keeps, ious = [], []
    for chunk in boxes.split(box_chunk):
        low, iou = _decode(sam, embedding, image_pe, chunk)
        low, iou = low.float(), iou.float()
        keep = iou >= iou_threshold
        rank = survived + torch.cumsum(keep, 0, dtype=torch.int32)
        survived = rank[-1]
        reach = (low > logit_threshold) & keep[:, None, None]
        _paint_chunk(labels, low, reach, rank, rows, cols, width, mask_threshold)
        keeps.append(keep)
        ious.append(iou)
    keep, iou = torch.cat(keeps).cpu(), torch.cat(ious).cpu()
    painted = keep.nonzero()[:, 0]
    return labels.view(height, width).cpu().numpy(), painted, iou[painted].numpy()


def _paint_chunk(
    labels: Tensor, low: Tensor, reach: Tensor, rank: Tensor, rows: _Upsampling, cols: _Upsampling, width: int,
    mask_threshold: float,
) -> None:
    """Upsample each mask inside the tile window its reachable low-res pixels cover, and scatter-max it."""
    n, low_size, _ = low.shape
    any_row, any_col = reach.any(dim=2), reach.any(dim=1)
    span = torch.arange(low_size, device=low.device)
    big = torch.full_like(span, low_size)
    lo_y, hi_y = torch.where(any_row, span, big).amin(1), torch.where(any_row, span, -1).amax(1)
    lo_x, hi_x = torch.where(any_col, span, big).amin(1), torch.where(any_col, span, -1).amax(1)
    y0, y1 = rows.window(lo_y, hi_y)
    x0, x1 = cols.window(lo_x, hi_x)
    windows = torch.stack((y0, (y1 - y0).clamp(min=0), x0, (x1 - x0).clamp(min=0)), dim=1).tolist()  # the host sync
    for group in _groups(windows):
        index = torch.tensor(group, device=low.device)
        y, x = _window_grids([windows[i] for i in group], low.device, len(rows.first), width)
        values = _bilinear(
            lambda r, c: _bilinear(lambda rr, cc: low[index[:, None, None], rr, cc], rows.to_model.at(r), cols.to_model.at(c)),
            rows.to_tile.at(y.index),
            cols.to_tile.at(x.index),
        )
        inside = (torch.sigmoid(values) > mask_threshold) & y.valid & x.valid
        painted = torch.where(inside, rank[index][:, None, None], 0)
        labels.scatter_reduce_(0, (y.index * width + x.index).flatten(), painted.flatten(), reduce="amax")


@dataclass(frozen=True)
class _Grid:
    index: Tensor  # tile pixel indices along one axis, clamped into the tile
    valid: Tensor  # False where the padded grid runs past a mask's window


def _window_grids(windows: list[list[int]], device: torch.device, height: int, width: int) -> tuple[_Grid, _Grid]:
    """Padded (n, R, 1) row and (n, 1, C) column grids covering each ``[y0, rows, x0, cols]`` window."""
    y0, rows, x0, cols = torch.tensor(windows, device=device).unbind(1)
    steps_y = torch.arange(max(w[1] for w in windows), device=device)
    steps_x = torch.arange(max(w[3] for w in windows), device=device)
    row_grid = _Grid((y0[:, None] + steps_y).clamp(max=height - 1)[:, :, None], (steps_y < rows[:, None])[:, :, None])
    col_grid = _Grid((x0[:, None] + steps_x).clamp(max=width - 1)[:, None, :], (steps_x < cols[:, None])[:, None, :])
    return row_grid, col_grid


def _groups(windows: list[list[int]]) -> list[list[int]]:
    """Masks with non-empty windows, grouped by size so each group's padded grid stays under the budget."""
    order = sorted((i for i, w in enumerate(windows) if w[1] and w[3]), key=lambda i: windows[i][1] * windows[i][3])
    groups: list[list[int]] = []
    current: list[int] = []
    rows = cols = 0
    for i in order:
        new_rows, new_cols = max(rows, windows[i][1]), max(cols, windows[i][3])
        if current and (len(current) + 1) * new_rows * new_cols > WINDOW_BUDGET:
            groups.append(current)
            current, new_rows, new_cols = [], windows[i][1], windows[i][3]
        current.append(i)
        rows, cols = new_rows, new_cols
    if current:
        groups.append(current)
    return groups
