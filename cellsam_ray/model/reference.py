"""Reference mode: one tile through the published CellSAM pipeline, step for step.

This is ``segment_cellular_image(img, model, normalize=...)`` of CellSAM v1.2 (``predict`` plus its
postprocessing), reproduced so that its output can be trusted as the yardstick for faster modes: one
mask-decoder call per box, full-resolution postprocessing per mask, everything in float32. The one
deliberate difference is that a tile where nothing is detected (or every mask is rejected) gives an
all-zero label image instead of the published crash.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam

from cellsam_ray.model.boxes import BBOX_THRESHOLD, boxes_to_input_pixels, confident_boxes
from cellsam_ray.model.cellfinder import detector_topk
from cellsam_ray.model.network import CellSAM
from cellsam_ray.model.postprocess import MIN_SIZE, fill_holes_and_remove_small_masks, paint_masks
from cellsam_ray.model.preprocess import (
    detector_input,
    embedding_input,
    format_image_shape,
    normalize_image,
    resize_to_model,
    sam_pixel_normalize,
)

IOU_THRESHOLD = 0.5
"""Masks whose predicted IoU is below this are dropped (the published ``CellSAM.iou_threshold``)."""
MASK_THRESHOLD = 0.4
"""A pixel belongs to a mask where sigmoid(logit) > this (the published ``CellSAM.mask_threshold``)."""


@dataclass(frozen=True)
class TileSegmentation:
    """One tile's result.

    ``boxes``, ``scores`` and ``ious`` describe the masks that were painted (those that passed the
    predicted-IoU filter), in paint order: descending detector score, so a later mask won overlaps.
    Their row k is mask k, not label k + 1: small objects are removed and the labels renumbered after
    painting; ``cell_rows[k - 1]`` is the row of label k's mask (its box, score and predicted IoU).
    """

    labels: np.ndarray  # (H, W) int32, 0 = background, cells 1..K (a cell swallowed by a later one's hole: absent)
    boxes: np.ndarray  # (N, 4) float32, x1 y1 x2 y2 in tile pixels
    scores: np.ndarray  # (N,) float32, CellFinder's score of each box
    ious: np.ndarray  # (N,) float32, SAM's predicted IoU of each mask
    embedding: np.ndarray | None  # (1, C, g, g) float32, the SAM image embedding of the tile, when asked for
    cell_rows: np.ndarray  # (K,) int64, the row of boxes/scores/ious that label k + 1 was painted from
    cell_regions: list  # (K,) label k + 1's extent, (rows, cols) slices, or None where it is absent


@torch.inference_mode()
def segment_tile_reference(
    image: np.ndarray,
    model: CellSAM,
    *,
    normalize: bool = True,
    bbox_threshold: float = BBOX_THRESHOLD,
    iou_threshold: float = IOU_THRESHOLD,
    mask_threshold: float = MASK_THRESHOLD,
    min_size: int = MIN_SIZE,
    device: str | torch.device = "cpu",
    keep_embedding: bool = False,
) -> TileSegmentation:
    """Segment an (H, W) or (H, W, C ≤ 3) tile, channels (blank, nuclear, whole-cell) right-aligned.

    ``normalize`` applies the library normalisation (99.9th-percentile clip and CLAHE); turn it off for
    a tile that is already normalised. ``model`` must already be on ``device``. ``keep_embedding`` returns
    SAM's image embedding too. Preprocessing and mask upsampling run on the CPU, as published; the
    networks run on ``device``.
    """
    formatted = format_image_shape(image)
    if normalize:
        formatted = normalize_image(formatted)
    height, width = formatted.shape[:2]
    sam = model.sam
    size = sam.image_encoder.img_size
    resized = resize_to_model(formatted, size)

    unit = embedding_input(resized, adv_mode=model.adv_mode)
    embedding = sam.image_encoder(sam_pixel_normalize(unit).to(device))
    logits, raw_boxes = model.cellfinder(detector_input(resized, adv_mode=model.adv_mode).to(device))
    scores, _, boxes = detector_topk(logits, raw_boxes, image_size=(size, size))
    scores, boxes = confident_boxes(scores[0].cpu(), boxes[0].cpu(), bbox_threshold)

    painted: list[int] = []
    ious: list[float] = []

    def masks() -> Iterator[np.ndarray]:
        # Stream one full-size mask at a time into the painter, noting which box each came from.
        for index, iou, mask in _surviving_masks(
            sam, embedding, boxes, (height, width), iou_threshold=iou_threshold, mask_threshold=mask_threshold
        ):
            painted.append(index)
            ious.append(iou)
            yield mask

    cleaned = fill_holes_and_remove_small_masks(paint_masks(masks(), (height, width)), min_size)
    kept = torch.tensor(painted, dtype=torch.long)
    return TileSegmentation(
        labels=cleaned.labels,
        boxes=boxes_to_input_pixels(boxes[kept], height, width, size).numpy().reshape(-1, 4),
        scores=scores[kept].numpy(),
        ious=np.asarray(ious, dtype=np.float32),
        embedding=embedding.float().cpu().numpy() if keep_embedding else None,
        cell_rows=cleaned.sources - 1,
        cell_regions=cleaned.regions,
    )


def _surviving_masks(
    sam: Sam,
    embedding: torch.Tensor,
    boxes: torch.Tensor,
    shape: tuple[int, int],
    *,
    iou_threshold: float,
    mask_threshold: float,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """(box index, predicted IoU, binary mask at ``shape``) for each box whose mask SAM rates well enough.

    One decoder call per box (boxes in the model frame, xyxy), as published; the low-resolution logits
    are upsampled on the CPU (bilinear to the model frame, then to ``shape``) and thresholded after a
    sigmoid. Thresholds compare in float32, like the published tensor comparisons.
    """
    size = sam.image_encoder.img_size
    dense_pe = sam.prompt_encoder.get_dense_pe()
    for index, box in enumerate(boxes):
        sparse, dense = sam.prompt_encoder(points=None, boxes=box.view(1, 4).to(embedding.device), masks=None)
        low_res, iou = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        iou = iou[0, 0].float().cpu()
        if iou < iou_threshold:
            continue
        logits = sam.postprocess_masks(low_res.float().cpu(), input_size=(size, size), original_size=shape)
        yield index, float(iou), (torch.sigmoid(logits[0, 0]) > mask_threshold).numpy()
