"""Fast mode: the reference answers for a batch of tiles, with different mechanics.

Reference mode (``reference.py``) follows the published code: one tile at a time, one mask-decoder call
per box, every mask upsampled to full tile resolution on the CPU. Here, for the same labels:

- tiles go through both ViT encoders as a batch, and the ViT attention runs in the fused
  scaled-dot-product kernel with SAM's decomposed relative-position bias as its additive mask, built
  for a few hundred queries at a time, so the (L, L) bias and probabilities never exist whole;
- all boxes of a tile go through the mask decoder in one call per chunk, with fused attention and the
  image embedding shared (not repeated) until the first layer makes it box-specific;
- masks stay at low resolution (256²); only the tile pixels a mask can reach are upsampled: the
  256 → 1024 resize of a crop is exactly the reference's, and the 1024 → tile resize is evaluated at
  those pixels with the source indices and weights PyTorch's kernel uses, equal to float rounding;
- painting is one scatter-max per group of masks on the device, and the host sees one small transfer
  per chunk of boxes instead of a sync per box.

Preprocessing, the box threshold and the cleanup are the reference's own functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos, window_partition, window_unpartition
from segment_anything.modeling.transformer import Attention as DecoderAttention
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
ATTENTION_QUERY_CHUNK = 256
"""ViT queries whose relative-position bias is built at once (256 × 4096 logits per head: 4 MB)."""
BOX_CHUNK = {"cpu": 4, "cuda": 32}
"""Boxes per mask-decoder call by device type. At v1.2 sizes a box's decoder activations take ~30 MB; on
a CPU larger chunks fall out of cache and get slower per box (4: 102 ms, 32: 140 ms on 1 Zen 4 core)."""
WINDOW_BUDGET = 1 << 21
"""Upsampled pixels computed at once when pasting; masks are grouped by window size to stay under it."""
_GATHER_COST = 20
"""Rough cost of one pixel evaluated from gathered taps, in pixels of a whole-mask resize (CPU-measured)."""
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
    box_chunk: int | None = None,
    bf16: bool = False,
) -> list[TileSegmentation]:
    """Segment tiles like ``segment_tile_reference``, each (H, W) or (H, W, C ≤ 3); one result per tile.

    ``model`` must already be on ``device``. ``box_chunk`` defaults to ``BOX_CHUNK`` for the device.
    ``bf16`` runs the networks under bfloat16 autocast (CUDA only; its answers differ slightly from the
    float32 reference, whose thresholds it keeps).
    """
    device = torch.device(device)
    box_chunk = box_chunk or BOX_CHUNK.get(device.type, BOX_CHUNK["cuda"])
    results: list[TileSegmentation] = []
    for start in range(0, len(images), tile_batch):
        batch = images[start : start + tile_batch]
        results.extend(
            _segment_batch(
                batch, model, normalize=normalize, bbox_threshold=bbox_threshold, iou_threshold=iou_threshold,
                mask_threshold=mask_threshold, min_size=min_size, device=device,
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
    """SAM's ViT attention through ``scaled_dot_product_attention``, in chunks of query rows.

    SAM adds ``q·R_h[y_q, y_k] + q·R_w[x_q, x_k]`` (unscaled q) to the scaled logits. That bias is
    built for ``ATTENTION_QUERY_CHUNK`` queries at a time and handed to the fused kernel as its additive
    mask, so neither the (L, L) bias nor the (L, L) probabilities of a global block exist at once.
    Measured on the tiny ViT's global block (4096 tokens, 2 Zen 4 threads): 58 ms, against 207 ms for
    segment-anything's ``Attention`` and 136 ms for folding the bias into wider queries and keys.
    """
    b, h, w, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        grid_q = q.unflatten(2, (h, w))
        rel_h = torch.einsum("bnyxc,ykc->bnyxk", grid_q, get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype)).flatten(2, 3)
        rel_w = torch.einsum("bnyxc,xkc->bnyxk", grid_q, get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype)).flatten(2, 3)
        parts = []
        for start in range(0, h * w, ATTENTION_QUERY_CHUNK):
            rows = slice(start, start + ATTENTION_QUERY_CHUNK)
            bias = (rel_h[:, :, rows, :, None] + rel_w[:, :, rows, None, :]).flatten(3)
            parts.append(F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=bias, scale=attn.scale))
        out = torch.cat(parts, dim=2)
    return attn.proj(out.transpose(1, 2).reshape(b, h, w, -1))


# --- masks ------------------------------------------------------------------------------------------------


def _decode(sam: Sam, embedding: Tensor, image_pe: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Single-mask low-res logits (n, s, s) and predicted IoU (n,) for n boxes (model frame, xyxy).

    segment-anything's ``MaskDecoder.predict_masks`` for many boxes at once: the image embedding stays
    one shared copy until the first layer updates it per box (so that layer's image-side projections
    run once), attention is fused, and only mask token 0 (the single-mask output) becomes a mask.
    Without a mask prompt the dense prompt is the same for every box.
    """
    decoder = sam.mask_decoder
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    n = boxes.shape[0]
    tokens = torch.cat((decoder.iou_token.weight, decoder.mask_tokens.weight), dim=0).expand(n, -1, -1)
    tokens = torch.cat((tokens.to(sparse.dtype), sparse), dim=1)
    channels, height, width = embedding.shape[1:]
    image = (embedding + dense[:1]).flatten(2).transpose(1, 2)  # (1, L, C): shared by every box
    hidden, keys = _two_way(decoder.transformer, image, image_pe.flatten(2).transpose(1, 2), tokens)
    upscaled = _upscale(decoder.output_upscaling, keys.transpose(1, 2).reshape(n, channels, height, width))
    hyper = decoder.output_hypernetworks_mlps[0](hidden[:, 1])
    masks = (hyper[:, None] @ upscaled.flatten(2)).view(n, *upscaled.shape[2:])
    return masks, decoder.iou_prediction_head(hidden[:, 0])[:, 0]


def _two_way(transformer: TwoWayTransformer, keys: Tensor, key_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``TwoWayTransformer.forward`` with ``keys`` (1, L, C) broadcast over the boxes until updated.

    Block for block as segment-anything's ``TwoWayAttentionBlock`` (including the first layer's
    self-attention without residual); ``keys + key_pe`` is formed once per layer instead of twice.
    """
    queries = tokens
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.norm1(_attend(layer.self_attn, queries, queries, queries))
        else:
            q = queries + tokens
            queries = layer.norm1(queries + _attend(layer.self_attn, q, q, queries))
        keys_pe = keys + key_pe
        queries = layer.norm2(queries + _attend(layer.cross_attn_token_to_image, queries + tokens, keys_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _attend(layer.cross_attn_image_to_token, keys_pe, queries + tokens, queries))
    attn_out = _attend(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + attn_out), keys


def _attend(attn: DecoderAttention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """segment-anything's decoder ``Attention``, fused; inputs may have batch 1 (shared by every box)."""
    batch = max(q.shape[0], k.shape[0])

    def heads(x: Tensor) -> Tensor:
        return x.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2).expand(batch, -1, -1, -1)

    out = F.scaled_dot_product_attention(heads(attn.q_proj(q)), heads(attn.k_proj(k)), heads(attn.v_proj(v)))
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def _upscale(upscaling: torch.nn.Sequential, x: Tensor) -> Tensor:
    """``MaskDecoder.output_upscaling`` with its channel LayerNorm as one fused ``layer_norm``."""
    up1, norm, act1, up2, act2 = upscaling
    x = up1(x).permute(0, 2, 3, 1)
    x = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    return act2(up2(act1(x)))


@dataclass(frozen=True)
class _Taps:
    """Bilinear taps along one axis: source indices ``i0``, ``i1`` and their weights ``w0``, ``w1``."""

    i0: Tensor
    i1: Tensor
    w0: Tensor
    w1: Tensor

    def at(self, index: Tensor) -> _Taps:
        return _Taps(self.i0[index], self.i1[index], self.w0[index], self.w1[index])


def _axis_taps(in_size: int, out_size: int) -> _Taps:
    """Taps of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis, as PyTorch builds them.

    The source position is ``scale·(j + ½) − ½`` with ``scale = in/out`` in float32, evaluated with one
    rounding (the kernel's fused multiply-add) and clamped at 0; the upper tap stops at the last pixel.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    centres = torch.arange(out_size, dtype=torch.float32) + 0.5
    source = (scale.double() * centres.double() - 0.5).float().clamp(min=0)
    i0 = source.floor().long().clamp(max=in_size - 1)
    w1 = (source - i0).clamp(0, 1)
    return _Taps(i0, torch.where(i0 < in_size - 1, i0 + 1, i0), 1 - w1, w1)


@dataclass(frozen=True)
class _Axis:
    """One axis of the reference's mask resizes: low-res -> model frame (integer factor) -> tile.

    The first resize is reproduced exactly by resizing a crop of the low-res mask (with an integer
    factor every source position is an exact shift of the full resize's); the second is evaluated only
    at the tile pixels wanted, from ``to_tile``.
    """

    low: int
    factor: int
    to_tile: _Taps  # tile pixel -> model-frame taps, on the device
    first: Tensor  # lowest low-res index each tile pixel reads; non-decreasing; device
    last: Tensor  # highest low-res index each tile pixel reads; non-decreasing; device
    first_host: list[int]
    last_host: list[int]

    @classmethod
    def build(cls, low: int, model: int, tile: int, device: torch.device) -> _Axis:
        if model % low:
            raise ValueError(f"model frame {model} is not a multiple of the low-res mask size {low}")
        to_model, to_tile = _axis_taps(low, model), _axis_taps(model, tile)
        first, last = to_model.i0[to_tile.i0], to_model.i1[to_tile.i1]
        on_device = _Taps(*(t.to(device) for t in (to_tile.i0, to_tile.i1, to_tile.w0, to_tile.w1)))
        return cls(low, model // low, on_device, first.to(device), last.to(device), first.tolist(), last.tolist())

    def window(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """[start, stop) of the tile pixels that read any low-res index in [lo, hi] (per mask)."""
        return torch.searchsorted(self.last, lo), torch.searchsorted(self.first, hi, right=True)

    def crop(self, start: int, length: int) -> tuple[int, int]:
        """(first, length) of the low-res pixels that tile pixels [start, start + length) read.

        Resizing exactly this crop reproduces the full resize at those pixels: every needed model-frame
        pixel sits at least two pixels inside the crop's resize, so neither edge clamp touches it.
        """
        first = self.first_host[start]
        return first, self.last_host[start + length - 1] + 1 - first


@dataclass(frozen=True)
class _Plan:
    """A group of masks pasted together: their tile windows and low-res crops along one axis."""

    start: Tensor  # (g,) first tile pixel of each window
    length: Tensor  # (g,) window lengths
    crop: Tensor  # (g,) first low-res index of each crop (all crops have the group's common length)
    size: int  # padded window length
    crop_size: int  # common crop length

    @classmethod
    def build(cls, axis: _Axis, windows: list[tuple[int, int]], device: torch.device) -> _Plan:
        crops = [axis.crop(start, length) for start, length in windows]
        crop_size = max(length for _, length in crops)
        crop_starts = [min(first, axis.low - crop_size) for first, _ in crops]  # shift back at the far edge
        return cls(
            torch.tensor([w[0] for w in windows], device=device),
            torch.tensor([w[1] for w in windows], device=device),
            torch.tensor(crop_starts, device=device),
            max(length for _, length in windows),
            crop_size,
        )

    def grid(self, tile: int) -> tuple[Tensor, Tensor]:
        """(g, size) tile pixel indices (clamped into the tile) and whether each lies in its window."""
        steps = torch.arange(self.size, device=self.start.device)
        return (self.start[:, None] + steps).clamp(max=tile - 1), steps < self.length[:, None]


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
    rows = _Axis.build(low_size, size, height, device)
    cols = _Axis.build(low_size, size, width, device)
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
        _paint_chunk(labels, low, reach, rank, rows, cols, mask_threshold)
        keeps.append(keep)
        ious.append(iou)
    keep, iou = torch.cat(keeps).cpu(), torch.cat(ious).cpu()
    painted = keep.nonzero()[:, 0]
    return labels.view(height, width).cpu().numpy(), painted, iou[painted].numpy()


def _paint_chunk(
    labels: Tensor, low: Tensor, reach: Tensor, rank: Tensor, rows: _Axis, cols: _Axis, mask_threshold: float
) -> None:
    """Upsample each mask where its reachable low-res pixels can land in the tile, and max-paint it.

    Small windows are evaluated pixel by pixel; a mask whose window covers much of the tile is cheaper
    to resize whole, exactly as the reference does.
    """
    height, width = len(rows.first_host), len(cols.first_host)
    span = torch.arange(low.shape[-1], device=low.device)
    any_row, any_col = reach.any(dim=2), reach.any(dim=1)
    lo_y = torch.where(any_row, span, low.shape[-1]).amin(1)
    hi_y = torch.where(any_row, span, -1).amax(1)
    lo_x = torch.where(any_col, span, low.shape[-1]).amin(1)
    hi_x = torch.where(any_col, span, -1).amax(1)
    y0, y1 = rows.window(lo_y, hi_y)
    x0, x1 = cols.window(lo_x, hi_x)
    lengths_y, lengths_x = (y1 - y0).clamp(min=0), (x1 - x0).clamp(min=0)  # 0: the mask reaches nothing
    windows = torch.stack((y0, lengths_y, x0, lengths_x), dim=1).tolist()  # the one host sync per chunk
    frame_pixels = rows.factor * rows.low * cols.factor * cols.low
    whole = [i for i, w in enumerate(windows) if _GATHER_COST * w[1] * w[3] > frame_pixels + height * width]
    per_group = max(WINDOW_BUDGET // frame_pixels, 1)
    for start in range(0, len(whole), per_group):
        index = torch.tensor(whole[start : start + per_group], device=low.device)
        model_size = (rows.factor * rows.low, cols.factor * cols.low)
        frame = F.interpolate(low[index, None], model_size, mode="bilinear", align_corners=False)
        values = F.interpolate(frame, (height, width), mode="bilinear", align_corners=False)[:, 0]
        painted = torch.where(torch.sigmoid(values) > mask_threshold, rank[index][:, None, None], 0).amax(0)
        torch.maximum(labels, painted.flatten(), out=labels)
    resized = set(whole)
    windowed = [[0, 0, 0, 0] if i in resized else w for i, w in enumerate(windows)]
    frame_scale = frame_pixels / (height * width)
    for group in _groups(windowed, frame_scale):
        _paint_windows(labels, low, rank, group, windows, rows, cols, mask_threshold)


def _paint_windows(
    labels: Tensor, low: Tensor, rank: Tensor, group: list[int], windows: list[list[int]], rows: _Axis, cols: _Axis,
    mask_threshold: float,
) -> None:
    """Evaluate the masks of ``group`` at the tile pixels of their windows and scatter-max them."""
    height, width = len(rows.first_host), len(cols.first_host)
    index = torch.tensor(group, device=low.device)
    y_plan = _Plan.build(rows, [(windows[i][0], windows[i][1]) for i in group], low.device)
    x_plan = _Plan.build(cols, [(windows[i][2], windows[i][3]) for i in group], low.device)
    y_crop = y_plan.crop[:, None] + torch.arange(y_plan.crop_size, device=low.device)
    x_crop = x_plan.crop[:, None] + torch.arange(x_plan.crop_size, device=low.device)
    crops = low[index[:, None, None], y_crop[:, :, None], x_crop[:, None, :]]
    frame_size = (rows.factor * y_plan.crop_size, cols.factor * x_plan.crop_size)
    frame = F.interpolate(crops[:, None], frame_size, mode="bilinear", align_corners=False)[:, 0]
    y, y_valid = y_plan.grid(height)
    x, x_valid = x_plan.grid(width)
    # Model-frame taps of each wanted tile pixel, relative to the group's crops. Pixels of the padded grid
    # outside a mask's own window (discarded below) may tap past its crop, so taps are clamped into it.
    r = rows.to_tile.at(y)
    c = cols.to_tile.at(x)
    r0, r1 = ((tap - rows.factor * y_plan.crop[:, None]).clamp(0, frame_size[0] - 1) for tap in (r.i0, r.i1))
    c0, c1 = ((tap - cols.factor * x_plan.crop[:, None]).clamp(0, frame_size[1] - 1) for tap in (c.i0, c.i1))
    g = torch.arange(len(group), device=low.device)[:, None]
    values = _bilinear_at(frame, g, r0, r1, r.w0, r.w1, c0, c1, c.w0, c.w1)
    inside = (torch.sigmoid(values) > mask_threshold) & y_valid[:, :, None] & x_valid[:, None, :]
    painted = torch.where(inside, rank[index][:, None, None], 0)
    labels.scatter_reduce_(0, (y[:, :, None] * width + x[:, None, :]).flatten(), painted.flatten(), reduce="amax")


def _bilinear_at(
    frame: Tensor, g: Tensor, r0: Tensor, r1: Tensor, rw0: Tensor, rw1: Tensor, c0: Tensor, c1: Tensor, cw0: Tensor,
    cw1: Tensor,
) -> Tensor:
    """Bilinear values (g, R, C) of ``frame`` at row taps (g, R) and column taps (g, C).

    Same taps, weights and order of operations as PyTorch's CPU kernel (along columns, then rows).
    """
    r0, r1, rw0, rw1 = (t[:, :, None] for t in (r0, r1, rw0, rw1))
    c0, c1, cw0, cw1 = (t[:, None, :] for t in (c0, c1, cw0, cw1))
    g = g[:, :, None]
    top = frame[g, r0, c0] * cw0 + frame[g, r0, c1] * cw1
    bottom = frame[g, r1, c0] * cw0 + frame[g, r1, c1] * cw1
    return top * rw0 + bottom * rw1


def _groups(windows: list[list[int]], frame_scale: float) -> list[list[int]]:
    """Masks with non-empty windows, grouped by size so each group's padded grid stays under the budget.

    ``frame_scale`` converts tile pixels to model-frame pixels, which dominate when tiles are small.
    """
    nonempty = (i for i, w in enumerate(windows) if w[1] > 0 and w[3] > 0)
    order = sorted(nonempty, key=lambda i: windows[i][1] * windows[i][3])
    budget = WINDOW_BUDGET / max(frame_scale, 1.0)
    groups: list[list[int]] = []
    current: list[int] = []
    rows = cols = 0
    for i in order:
        new_rows, new_cols = max(rows, windows[i][1]), max(cols, windows[i][3])
        if current and (len(current) + 1) * new_rows * new_cols > budget:
            groups.append(current)
            current, new_rows, new_cols = [], windows[i][1], windows[i][3]
        current.append(i)
        rows, cols = new_rows, new_cols
    if current:
        groups.append(current)
    return groups
