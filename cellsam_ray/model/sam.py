"""SAM (image encoder, prompt encoder, mask decoder) composed from segment-anything's modules.

segment-anything's ``build_sam_vit_*`` functions fix the prompt width, decoder sizes and image size;
CellSAM's test fixture and any future variant need other sizes, so the same modules are composed here
with every size taken from :class:`CellSAMConfig`. The constants below are the ones SAM hard-codes.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from cellsam_ray.model.config import CellSAMConfig

# SAM's ImageNet pixel statistics on the 0-255 scale; non-persistent buffers, so never in a checkpoint.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# Architecture constants SAM does not vary between its variants.
TWO_WAY_DEPTH = 2
IOU_HEAD_DEPTH = 3
NUM_MULTIMASK_OUTPUTS = 3


def build_image_encoder(config: CellSAMConfig, *, out_chans: int) -> ImageEncoderViT:
    """SAM's ViT with windowed + global attention and relative positions, sized by ``config``.

    Used twice: with its neck for the SAM branches and, neck dropped, as CellFinder's trunk.
    """
    return ImageEncoderViT(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.encoder_embed_dim,
        depth=config.encoder_depth,
        num_heads=config.encoder_num_heads,
        mlp_ratio=config.mlp_ratio,
        out_chans=out_chans,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=config.window_size,
        global_attn_indexes=tuple(config.encoder_global_attn_indexes),
    )


def build_sam(config: CellSAMConfig) -> Sam:
    """One SAM branch (``model`` or ``model_cp`` in the checkpoint), in eval mode."""
    grid = config.embedding_grid
    sam = Sam(
        image_encoder=build_image_encoder(config, out_chans=config.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=NUM_MULTIMASK_OUTPUTS,
            transformer=TwoWayTransformer(
                depth=TWO_WAY_DEPTH,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=IOU_HEAD_DEPTH,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()

