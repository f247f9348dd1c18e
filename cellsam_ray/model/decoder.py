"""SAM's prompt encoder and mask decoder for many boxes at once (what fast mode decodes with).

segment-anything's ``MaskDecoder.predict_masks`` takes one prompt set per image embedding, so the
published code calls it once per box. Here a chunk of boxes goes through in one call: the image
embedding stays one shared copy until the first layer updates it per box (so that layer's image-side
projections run once), attention is fused, and only mask token 0 (the single-mask output) becomes a
mask. Without a mask prompt the dense prompt is the same for every box. The prompt encoder is a
float32 island under bf16 (box corners become its Fourier features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam, TwoWayTransformer
from segment_anything.modeling.transformer import Attention as DecoderAttention
from torch import Tensor

from cellsam_ray.model.precision import float32_island


def prompt_positions(sam: Sam, device: torch.device) -> Tensor:
    """SAM's dense positional encoding of the embedding grid (float32), once per batch."""
    with torch.autocast(device.type, enabled=False):
        return sam.prompt_encoder.get_dense_pe()


def decode(sam: Sam, embedding: Tensor, image_pe: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Single-mask low-res logits (n, s, s) and predicted IoU (n,) for n boxes (model frame, xyxy)."""
    decoder = sam.mask_decoder
    with float32_island(boxes):
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes.float(), masks=None)
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
