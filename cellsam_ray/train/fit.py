"""Training in this process: load the data, run the loop, write checkpoints and a loss log.

Good for a laptop, a single GPU and tests; ``distributed`` runs the same loop on Ray Train workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cellsam_ray.model.network import CellSAM
from cellsam_ray.train.checkpoint import CHECKPOINT_NAME, save_checkpoint
from cellsam_ray.train.data import DataSpec, compact, prepare_tile
from cellsam_ray.train.loop import (
    Objective,
    TrainSettings,
    freeze_parts,
    initial_model,
    resolve_device,
    run_steps,
)
from cellsam_ray.train.sources import load_images, synthetic_slides
from cellsam_ray.train.validate import score_tiles

LOG_NAME = "losses.jsonl"
STATE_NAME = "train_state.pt"
VALIDATION_NAME = "validation.json"


def materialise(data: DataSpec) -> DataSpec:
    """The spec with its synthetic slides written and listed as plain slides, so workers only read
    (styled synthetic images are drawn in memory by whoever loads them)."""
    if not data.synthetic_seeds or data.synthetic_styles:
        return data
    return data.model_copy(update={"slides": data.slides + synthetic_slides(data), "synthetic_seeds": []})


def fit(settings: TrainSettings, data: DataSpec, out: str | Path, *, log: Callable[[str], None] = print) -> CellSAM:
    """Train in-process; ``out`` receives ``cellsam.pt``, ``config.json`` and ``losses.jsonl``. The model.

    With ``settings.resume`` and a ``train_state.pt`` in ``out`` (written beside every periodic
    checkpoint), training continues from that checkpoint at its step. With ``settings.validation_tiles``
    that many tiles are held back (chosen by ``data.tile_seed``), scored before and after training, and
    the scores written to ``validation.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    resume = _resume_state(settings, out)
    start = settings
    if resume:
        start = settings.model_copy(update={"init": str(out / CHECKPOINT_NAME), "anchors": "keep",
                                            "local_attention": False})
    net = initial_model(start)
    freeze_parts(net, settings)
    size = net.config.image_size
    images = load_images(materialise(data), size)
    held: list = []
    if settings.validation_tiles:
        images, held = split_validation(images, settings.validation_tiles, data.tile_seed)
        if not held:
            log("too few labelled tiles to hold any back: no validation")
    tiles = [compact(prepare_tile(image, size)) for image in images]
    log(f"{len(tiles)} labelled tiles of {size}² px; training on {device}"
        + (f"; {len(held)} held back for validation" if held else "")
        + (f"; resuming after step {resume['step']}" if resume else ""))
    before = score_tiles(net, held, device=device) if held else None
    if before:
        log(f"validation before: {describe(before)}")
    objective = Objective(net, settings).to(device)
    log_path = out / LOG_NAME
    if not resume:
        log_path.write_text("")

    def report(step: int, means: dict[str, float], last: bool) -> None:
        log(format_losses(step, settings.steps, means))
        with log_path.open("a") as f:
            f.write(json.dumps({"step": step, **means}) + "\n")
        if last:
            save_checkpoint(net, out)

    def keep_state(state: dict) -> None:
        save_checkpoint(net, out)
        partial = out / f".{STATE_NAME}.part"
        torch.save(state, partial)
        os.replace(partial, out / STATE_NAME)

    run_steps(objective, net, tiles, settings, report, resume=resume, keep_state=keep_state)
    log(f"checkpoint: {out / CHECKPOINT_NAME}")
    if before:
        after = score_tiles(net, held, device=device)
        log(f"validation after:  {describe(after)}")
        (out / VALIDATION_NAME).write_text(json.dumps({"tiles": len(held), "before": before.as_dict(),
                                                       "after": after.as_dict()}, indent=1) + "\n")
    return net.eval()


def _resume_state(settings: TrainSettings, out: Path) -> dict | None:
    path = out / STATE_NAME
    if not (settings.resume and path.is_file() and (out / CHECKPOINT_NAME).is_file()):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if state["step"] < settings.steps else None


def split_validation(images: list, count: int, seed: int) -> tuple[list, list]:
    """(training, validation): ``count`` images with cells held back, chosen by ``seed``; at least one
    image is left to train on (so a single image is not validated)."""
    with_cells = [i for i, image in enumerate(images) if image.labels.any()]
    count = min(count, len(with_cells), len(images) - 1)
    if count <= 0:
        return images, []
    held = set(np.random.default_rng([seed, 1]).permutation(with_cells)[:count].tolist())
    return [im for i, im in enumerate(images) if i not in held], [im for i, im in enumerate(images) if i in held]


def describe(score) -> str:
    return (f"F1@0.5 {score.f1:.3f}  precision {score.precision:.3f}  recall {score.recall:.3f}  "
            f"({score.true} true cells, {score.predicted} predicted)")


def format_losses(step: int, steps: int, means: dict[str, float]) -> str:
    shown = " ".join(f"{k} {means[k]:.4f}" for k in ("loss", "classification", "l1", "giou", "mask_bce",
                                                       "mask_dice", "mask_iou") if k in means)
    return f"step {step}/{steps}  {shown}  ({means['seconds_per_step']:.2f} s/step)"
