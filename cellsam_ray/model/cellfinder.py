"""CellFinder: CellSAM's box detector, an Anchor-DETR with RCDA on its own SAM ViT trunk.

Module and attribute names reproduce the published ``cellfinder.decode_head.*`` state-dict keys
(``backbone.body``, ``input_proj.0``, ``transformer.*``), so a released checkpoint loads strictly.
The input is always a full, unpadded square, so the published padding masks are all False and are left
out; dropout is 0 in every released configuration and is left out too. ``forward`` is what inference
runs; ``forward_layers`` also gives the intermediate decoder layers' predictions, which training supervises.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn

from cellsam_ray.model.config import CellSAMConfig
from cellsam_ray.model.precision import float32_island
from cellsam_ray.model.rcda import MultiheadRCDA
from cellsam_ray.model.sam import build_image_encoder


class ViTTrunk(nn.Module):
    """SAM's ViT without its neck: patch embedding, absolute positions, blocks -> (B, C, h, w)."""

    def __init__(self, encoder: ImageEncoderViT) -> None:
        """Takes the trunk of ``encoder``; its neck is discarded (CellFinder projects with its own conv)."""
        super().__init__()
        self.patch_embed = encoder.patch_embed
        self.blocks = encoder.blocks
        self.pos_embed = encoder.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class Backbone(nn.Module):
    """Holder giving the trunk its published key prefix ``backbone.body``."""

    def __init__(self, body: ViTTrunk) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def sine_embedding_1d(pos: Tensor, num_feats: int) -> Tensor:
    """Interleaved sin/cos of ``2π·pos / 10000^(2⌊i/2⌋/num_feats)``: (...,) -> (..., num_feats)."""
    exponent = 2 * (torch.arange(num_feats, dtype=torch.float32, device=pos.device) // 2) / num_feats
    angles = (pos * (2 * math.pi))[..., None] / (10000**exponent)
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_embedding_2d(points: Tensor, num_feats: int) -> Tensor:
    """(..., 2) points as (x, y) -> (..., num_feats): the y half first, then the x half."""
    half = num_feats // 2
    return torch.cat((sine_embedding_1d(points[..., 1], half), sine_embedding_1d(points[..., 0], half)), dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1-x floored at ``eps`` (DETR's convention)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class FFN(nn.Module):
    """Post-norm feed-forward block: ``norm2(x + linear2(relu(linear1(x))))``."""

    def __init__(self, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(x + self.linear2(torch.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """RCDA self-attention over the feature map, post-norm, then FFN."""

    def __init__(self, d_model: int, d_ffn: int, nheads: int) -> None:
        super().__init__()
        self.self_attn = MultiheadRCDA(d_model, nheads)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(self, src: Tensor, pos_x: Tensor, pos_y: Tensor) -> Tensor:
        """``src`` (B, H, W, d); ``pos_x`` (W, d) and ``pos_y`` (H, d) position embeddings."""
        b, h, w, d = src.shape
        src_x = src + pos_x[None, None]
        src_y = src + pos_y[None, :, None]
        attn = self.self_attn(src_x.reshape(b, h * w, d), src_y.reshape(b, h * w, d), src_x, src_y, src)
        return self.ffn(self.norm1(src + attn.view(b, h, w, d)))


class DecoderLayer(nn.Module):
    """Query self-attention, RCDA cross-attention to the map, FFN; each post-norm."""

    def __init__(self, d_model: int, d_ffn: int, nheads: int) -> None:
        super().__init__()
        self.cross_attn = MultiheadRCDA(d_model, nheads)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nheads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, query_pos_x: Tensor, query_pos_y: Tensor, memory_x: Tensor,
        memory_y: Tensor, memory: Tensor,
    ) -> Tensor:
        """``tgt`` (B, Q, d); query embeddings (Q, d); memory maps (B, H, W, d), keys with positions added."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        attn = self.cross_attn(tgt + query_pos_x, tgt + query_pos_y, memory_x, memory_y, memory)
        return self.ffn(self.norm1(tgt + attn))


class AnchorDETRTransformer(nn.Module):
    """Encoder, decoder, anchor points and heads of Anchor-DETR with one feature level."""

    def __init__(self, config: CellSAMConfig) -> None:
        super().__init__()
        d, ffn, heads = config.cellfinder_hidden_dim, config.cellfinder_dim_feedforward, config.cellfinder_nheads
        self.d_model = d
        self.num_pattern = config.cellfinder_num_query_pattern
        self.encoder_layers = nn.ModuleList(EncoderLayer(d, ffn, heads) for _ in range(config.cellfinder_enc_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(d, ffn, heads) for _ in range(config.cellfinder_dec_layers))
        self.pattern = nn.Embedding(self.num_pattern, d)
        self.position = nn.Embedding(config.cellfinder_num_queries, 2)  # learned anchor points (x, y) in [0, 1]
        self.adapt_pos2d = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.adapt_pos1d = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        class_head = nn.Linear(d, config.cellfinder_num_classes)
        box_head = MLP(d, d, 4, 3)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior 0.01
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.constant_(box_head.layers[-1].bias, 0.0)
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
        nn.init.uniform_(self.position.weight, 0, 1)
        # The published model shares one head across decoder layers but lists it once per layer, so the
        # checkpoint holds dec_layers identical copies; the same instance repeated keeps those keys.
        self.class_embed = nn.ModuleList([class_head] * config.cellfinder_dec_layers)
        self.bbox_embed = nn.ModuleList([box_head] * config.cellfinder_dec_layers)

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """``src`` (B, d, H, W) projected features -> last layer's (logits (B, Q, C), boxes (B, Q, 4) cxcywh)."""
        return self.forward_layers(src, every_layer=False)[-1]

    def forward_layers(self, src: Tensor, *, every_layer: bool = True) -> list[tuple[Tensor, Tensor]]:
        """(logits, boxes) of every decoder layer, first to last (only the last when ``every_layer`` is off).

        Inference reads the last layer only; training supervises every layer (DETR's auxiliary losses),
        all through the one shared head.
        """
        b, d, h, w = src.shape
        # Pixel-centre coordinates in [0, 1]: the published mask2pos for an unpadded map.
        pos_x = self.adapt_pos1d(sine_embedding_1d((torch.arange(w, device=src.device) + 0.5) / w, d))
        pos_y = self.adapt_pos1d(sine_embedding_1d((torch.arange(h, device=src.device) + 0.5) / h, d))
        memory = src.permute(0, 2, 3, 1)
        for layer in self.encoder_layers:
            memory = layer(memory, pos_x, pos_y)

        anchors = self.position.weight.repeat(self.num_pattern, 1)  # (P·Q, 2), pattern-major
        tgt = self.pattern.weight.repeat_interleave(self.position.num_embeddings, dim=0).expand(b, -1, -1)
        query_pos = self.adapt_pos2d(sine_embedding_2d(anchors, d))
        query_pos_x = self.adapt_pos1d(sine_embedding_1d(anchors[:, 0], d))
        query_pos_y = self.adapt_pos1d(sine_embedding_1d(anchors[:, 1], d))
        memory_x = memory + pos_x[None, None]
        memory_y = memory + pos_y[None, :, None]
        states = []
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, query_pos_x, query_pos_y, memory_x, memory_y, memory)
            states.append(tgt)
        return [self._heads(state, anchors) for state in (states if every_layer else states[-1:])]

    def _heads(self, tgt: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits and sigmoid (cx, cy, w, h) boxes, centres predicted relative to the anchors.

        Always in float32, also under bf16 autocast: scores decide ties in the top-k and the threshold,
        and box corners become SAM's prompts.
        """
        with float32_island(tgt):
            tgt = tgt.float()
            logits = self.class_embed[-1](tgt)
            deltas = self.bbox_embed[-1](tgt)
            centres = deltas[..., :2] + inverse_sigmoid(anchors.float())
            boxes = torch.cat((centres, deltas[..., 2:]), dim=-1).sigmoid()
        return logits, boxes


class AnchorDETR(nn.Module):
    """Trunk -> 1×1 conv + GroupNorm(32) -> transformer (the published ``decode_head``)."""

    def __init__(self, config: CellSAMConfig) -> None:
        super().__init__()
        d = config.cellfinder_hidden_dim
        self.transformer = AnchorDETRTransformer(config)
        proj = nn.Sequential(nn.Conv2d(config.encoder_embed_dim, d, kernel_size=1), nn.GroupNorm(32, d))
        nn.init.xavier_uniform_(proj[0].weight)
        nn.init.zeros_(proj[0].bias)
        self.input_proj = nn.ModuleList([proj])
        self.backbone = Backbone(ViTTrunk(build_image_encoder(config, out_chans=config.prompt_embed_dim)))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.transformer(self.input_proj[0](self.backbone(images)))

    def forward_layers(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every decoder layer's (logits, boxes), for training (see ``AnchorDETRTransformer.forward_layers``)."""
        return self.transformer.forward_layers(self.input_proj[0](self.backbone(images)))


class CellFinder(nn.Module):
    """The detector; ``decode_head`` carries every weight."""

    def __init__(self, config: CellSAMConfig) -> None:
        super().__init__()
        self.decode_head = AnchorDETR(config)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images`` (B, 3, S, S) preprocessed detector input -> (logits (B, Q, classes), boxes (B, Q, 4)).

        Boxes are normalised (cx, cy, w, h) of the last decoder layer, the only one inference uses.
        """
        return self.decode_head(images)

    def forward_layers(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(logits, boxes) of every decoder layer, first to last; the last equals ``forward``'s."""
        return self.decode_head.forward_layers(images)


def detector_topk(
    logits: Tensor, boxes: Tensor, image_size: tuple[int, int] = (1024, 1024), k: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The published PostProcess: sigmoid scores, top-k over all (query, class) pairs, xyxy boxes.

    ``k`` defaults to the number of queries, as published, so a query can appear once per class.
    ``image_size`` is (H, W) of the frame boxes are scaled to (the 1024² model input).
    Returns scores (B, k) descending, labels (B, k) int64, boxes (B, k, 4) x1 y1 x2 y2.
    """
    num_queries, num_classes = logits.shape[1:]
    scores, flat = torch.topk(logits.sigmoid().flatten(1), num_queries if k is None else k, dim=1)
    query, labels = flat // num_classes, flat % num_classes
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
    height, width = image_size
    xyxy = xyxy * xyxy.new_tensor([width, height, width, height])
    return scores, labels, torch.gather(xyxy, 1, query[..., None].expand(-1, -1, 4))
