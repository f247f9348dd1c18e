"""Every size of the CellSAM network, chosen in one place.

The published code hard-codes ViT-B sizes in three spots (segment-anything's ``build_sam_vit_b``,
CellSAM's ``CellfinderAnchorDetr`` and ``modelconfig.yaml``); here they are fields of one pydantic
model so that a test fixture (the golden "tiny" model) and the real v1.2 checkpoint are built by the
same code. Field names are the keys of ``tiny_config.json``.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import pydantic
from pydantic import Field, model_validator

from cellsam_ray.errors import UserError


class CellSAMConfig(pydantic.BaseModel):
    """Sizes of the two SAM branches and of CellFinder (Anchor-DETR on its own ViT trunk)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    # SAM image encoder; CellFinder's trunk is a second ViT with the same sizes.
    image_size: int = Field(1024, description="Square input side of both encoders.")
    patch_size: int = Field(16, description="ViT patch side; the feature grid is image_size/patch_size.")
    encoder_embed_dim: int = Field(768, description="ViT width.")
    encoder_depth: int = Field(12, description="Number of ViT blocks.")
    encoder_num_heads: int = Field(12, description="ViT attention heads.")
    encoder_global_attn_indexes: tuple[int, ...] = Field((2, 5, 8, 11), description="Blocks with global attention.")
    window_size: int = Field(14, description="Window side of the windowed-attention blocks.")
    mlp_ratio: float = Field(4.0, description="ViT MLP width / embed dim.")
    # SAM prompt encoder and mask decoder.
    prompt_embed_dim: int = Field(256, description="Width of the SAM embedding, prompts and decoder.")
    decoder_mlp_dim: int = Field(2048, description="MLP width in the two-way transformer.")
    decoder_num_heads: int = Field(8, description="Attention heads in the two-way transformer.")
    mask_in_chans: int = Field(16, description="Hidden channels of the (unused) mask-prompt downscaler.")
    iou_head_hidden_dim: int = Field(256, description="Hidden width of the IoU prediction head.")
    # CellFinder (Anchor-DETR).
    cellfinder_hidden_dim: int = Field(256, description="Transformer width d_model.")
    cellfinder_nheads: int = Field(8, description="Attention heads in every CellFinder attention.")
    cellfinder_dim_feedforward: int = Field(1024, description="FFN width.")
    cellfinder_enc_layers: int = Field(6, description="Spatial RCDA encoder layers.")
    cellfinder_dec_layers: int = Field(6, description="Decoder layers (self-attn, RCDA cross-attn, FFN).")
    cellfinder_num_queries: int = Field(3500, description="Learned anchor points (queries per pattern).")
    cellfinder_num_query_pattern: int = Field(1, description="Query patterns sharing each anchor point.")
    cellfinder_num_classes: int = Field(2, description="Sigmoid classes per query.")
    cellfinder_attention: Literal["RCDA"] = Field("RCDA", description="Only row-column decoupled attention.")
    cellfinder_spatial_prior: Literal["learned"] = Field("learned", description="Only learned anchor points.")

    @model_validator(mode="after")
    def _check_divisibility(self) -> CellSAMConfig:
        problems = []
        if self.image_size % self.patch_size:
            problems.append("image_size must be a multiple of patch_size")
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append("encoder_embed_dim must be a multiple of encoder_num_heads")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            problems.append("encoder_global_attn_indexes must lie in [0, encoder_depth)")
        if self.prompt_embed_dim % (2 * self.decoder_num_heads):
            problems.append("prompt_embed_dim must be a multiple of 2*decoder_num_heads")
        if self.cellfinder_hidden_dim % 32 or self.cellfinder_hidden_dim % self.cellfinder_nheads:
            problems.append("cellfinder_hidden_dim must be a multiple of 32 (GroupNorm) and of cellfinder_nheads")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def embedding_grid(self) -> int:
        """Side of both encoders' feature grids (64 for 1024/16)."""
        return self.image_size // self.patch_size

    @classmethod
    def preset(cls, name: str) -> CellSAMConfig:
        """A published size by name; ``"v1.2"`` is the released CellSAM (the field defaults)."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    @classmethod
    def from_json(cls, path_or_url: str) -> CellSAMConfig:
        """Read a config from a local path or any fsspec URL; every problem is a one-line UserError."""
        try:
            if "://" in path_or_url:
                import fsspec  # only for remote configs: the GPU check reads local files without fsspec

                with fsspec.open(path_or_url, "r") as f:
                    data = json.load(f)
            else:
                with open(path_or_url) as f:
                    data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"model config {path_or_url} not found") from None
        except json.JSONDecodeError as err:
            raise UserError(f"model config {path_or_url} is not JSON: {err}") from None
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as err:
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
            raise UserError(f"model config {path_or_url} is invalid: {details}") from None


# The released v1.2 sizes are the field defaults; a new size is one more entry here.
PRESETS: dict[str, dict] = {"v1.2": {}}


def load_config(spec: str) -> CellSAMConfig:
    """A preset name (``"v1.2"``) or a path/URL of a JSON config."""
    if spec in PRESETS:
        return CellSAMConfig.preset(spec)
    if "://" in spec or os.path.exists(spec):
        return CellSAMConfig.from_json(spec)
    raise UserError(f"unknown model config {spec!r}: give a preset ({', '.join(sorted(PRESETS))}) or a JSON file")
