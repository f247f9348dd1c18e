"""Labelled images for training, prepared as tiles, and batches with their targets.

A ``LabelledImage`` is an (H, W, 3) float32 image in CellSAM's channel layout (blank, nuclear, whole-cell)
exactly as inference will see it, plus its cell labels, so a model is trained on what it will be shown;
``train.sources`` makes them from slides, folders and synthetic tissue, as ``DataSpec`` names them.

``prepare_tile`` stretches a labelled image to the model's square and runs the published preprocessing
of both branches once; ``make_batch`` augments (the 8 flips and right-angle turns, which the
preprocessing commutes with) and derives boxes and sampled masks from the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage
from skimage.segmentation import relabel_sequential
from torch import Tensor

from cellsam_ray.model.postprocess import MIN_SIZE
from cellsam_ray.model.preprocess import detector_input, embedding_input, resize_to_model
from cellsam_ray.train.box_ops import xyxy_to_cxcywh


@dataclass(frozen=True)
class LabelledImage:
    """An image as CellSAM's inference receives it, and its true cells."""

    image: np.ndarray  # (H, W, 3) float32, channels (blank, nuclear, whole-cell), already normalised
    labels: np.ndarray  # (H, W) int32, 0 = background


@dataclass(frozen=True)
class TrainingTile:
    """One tile preprocessed for both networks, its cells mapped to the model's square."""

    embed: Tensor  # (3, S, S) float32: ``embedding_input`` (before SAM's pixel normalisation)
    detect: Tensor  # (3, S, S) float32: ``detector_input``
    labels: Tensor  # (S, S) int32: cell ids in the model frame


@dataclass(frozen=True)
class Batch:
    """A batch of augmented tiles with per-image targets."""

    embed: Tensor  # (B, 3, S, S)
    detect: Tensor  # (B, 3, S, S)
    boxes: list[Tensor]  # per image (N, 4) normalised cxcywh of every cell
    prompts: list[Tensor]  # per image (K, 4) xyxy model pixels: jittered true boxes of sampled cells
    masks: list[Tensor]  # per image (K, S, S) float32 masks of those cells


class DataSpec(BaseModel):
    """Where the labelled tiles come from; one or more sources, combined."""

    model_config = ConfigDict(extra="forbid")

    slides: list[str] = Field(default_factory=list, description="OME-Zarr slides (URLs) with a label image.")
    nuclear: list[str] = Field(default_factory=list, description="Nuclear channel(s) of the slides, by name or index.")
    whole_cell: list[str] = Field(default_factory=list, description="Whole-cell channel(s) of the slides.")
    label: str = Field(default="ground_truth", description="The slides' label image holding the true cells.")
    level: int = Field(default=0, ge=0, description="Pyramid level of the slides to train on.")
    folder: str | None = Field(default=None, description="Folder of NAME.ext images with NAME_labels.ext cells.")
    normalize: bool = Field(default=True, description="Library normalisation of folder images (as segment-image).")
    synthetic_seeds: list[int] = Field(default_factory=list, description="Seeds of synthetic slides to generate.")
    synthetic_size: int = Field(default=2048, gt=0, description="Side of each synthetic slide in pixels.")
    synthetic_dir: str | None = Field(default=None, description="Where synthetic slides are written.")
    synthetic_styles: list[str] = Field(default_factory=list, description="Draw the synthetic seeds in these "
                                        "styles (cellsam_ray.synth.styles), in memory, augmented (scale, "
                                        "intensity, channel presence); without it the seeds are 'tissue' "
                                        "slides written as OME-Zarr and read like any slide.")
    stride: int | None = Field(default=None, gt=0, description="Window step on slides (default: the window side).")
    max_tiles: int | None = Field(default=None, gt=0, description="Keep this many tiles (few-shot), chosen by seed.")
    tile_seed: int = Field(default=0, description="Chooses the tiles kept by max_tiles.")
    storage_options: dict | None = Field(default=None, description="fsspec options for remote slides.")

    @model_validator(mode="after")
    def _some_source(self) -> DataSpec:
        if not (self.slides or self.folder or self.synthetic_seeds):
            raise ValueError("give labelled data: slides, a folder or synthetic seeds")
        if (self.slides or (self.synthetic_seeds and not self.synthetic_styles)) and not self.nuclear:
            raise ValueError("slides need their nuclear channel(s)")
        if self.synthetic_styles and not self.synthetic_seeds:
            raise ValueError("synthetic styles need synthetic seeds")
        if self.synthetic_seeds and not self.synthetic_dir and not self.synthetic_styles:
            raise ValueError("synthetic slides need a folder to be written to (synthetic_dir)")
        return self


def prepare_tile(item: LabelledImage, size: int) -> TrainingTile:
    """Stretch to ``size``² and run both published preprocessing paths; labels by nearest neighbour,
    renumbered 1..N (slide-wide ids can be large, and boxes are found per id)."""
    resized = resize_to_model(item.image, size)
    height, width = item.labels.shape
    sequential = relabel_sequential(item.labels)[0]
    rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(int), height - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * width / size).astype(int), width - 1)
    return TrainingTile(
        embed=embedding_input(resized)[0],
        detect=detector_input(resized)[0],
        labels=torch.from_numpy(np.ascontiguousarray(sequential[rows][:, cols], dtype=np.int32)),
    )


def compact(tile: TrainingTile) -> TrainingTile:
    """The tile with its network inputs in half precision: half the memory for a large training set
    (``make_batch`` turns them back to float32; both inputs lie in [0, 1] or near it)."""
    return TrainingTile(tile.embed.half(), tile.detect.half(), tile.labels)


def make_batch(
    tiles: list[TrainingTile],
    rng: np.random.Generator,
    *,
    masks_per_image: int,
    box_jitter: float,
    augment: bool = True,
) -> Batch:
    """Augment each tile, then derive every cell's box and ``masks_per_image`` sampled cells' masks.

    Cells smaller than the inference's minimum object size are not targets: inference removes them
    anyway. Prompt boxes are the true boxes with each side moved by up to ``box_jitter`` of the box's
    size, so SAM learns to cope with CellFinder's imprecise boxes.
    """
    embeds, detects, all_boxes, prompts, masks = [], [], [], [], []
    for tile in tiles:
        turns, flip = (int(rng.integers(4)), bool(rng.integers(2))) if augment else (0, False)
        views = [_dihedral(t, turns, flip) for t in (tile.embed, tile.detect, tile.labels)]
        embeds.append(views[0].float())  # tiles may be kept in half precision (``compact``)
        detects.append(views[1].float())
        boxes, cells = _cell_boxes(views[2].numpy())
        size = views[2].shape[-1]
        all_boxes.append(xyxy_to_cxcywh(torch.as_tensor(boxes / size)))
        chosen = rng.permutation(len(cells))[:masks_per_image]
        chosen_boxes = torch.as_tensor(boxes[chosen], dtype=torch.float32).reshape(-1, 4)
        spans = (chosen_boxes[:, 2:] - chosen_boxes[:, :2]).repeat(1, 2)
        noise = torch.as_tensor(rng.uniform(-box_jitter, box_jitter, chosen_boxes.shape), dtype=torch.float32)
        prompts.append(chosen_boxes + noise * spans)
        ids = torch.as_tensor(cells[chosen], dtype=torch.int32)
        masks.append((views[2][None] == ids[:, None, None]).float())
    return Batch(torch.stack(embeds), torch.stack(detects), all_boxes, prompts, masks)


def _dihedral(t: Tensor, turns: int, flip: bool) -> Tensor:
    t = torch.rot90(t, turns, dims=(-2, -1))
    return torch.flip(t, dims=(-1,)) if flip else t


def _cell_boxes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xyxy pixel-edge boxes (N, 4) float32 and ids (N,) of the cells with at least MIN_SIZE pixels."""
    boxes, ids = [], []
    areas = np.bincount(labels.ravel())
    for index, found in enumerate(ndimage.find_objects(labels)):
        if found is None or areas[index + 1] < MIN_SIZE:
            continue
        rows, cols = found
        boxes.append((cols.start, rows.start, cols.stop, rows.stop))
        ids.append(index + 1)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(ids, dtype=np.int64)
