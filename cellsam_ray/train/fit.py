"""Training in this process: load the data, run the loop, write checkpoints and a loss log.

Good for a laptop, a single GPU and tests; ``distributed`` runs the same loop on Ray Train workers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cellsam_ray.model.network import CellSAM
from cellsam_ray.train.checkpoint import CHECKPOINT_NAME, save_checkpoint
from cellsam_ray.train.data import DataSpec, load_images, prepare_tile, synthetic_slides
from cellsam_ray.train.loop import (
    Objective,
    TrainSettings,
    freeze_parts,
    initial_model,
    resolve_device,
    run_steps,
)

LOG_NAME = "losses.jsonl"


def materialise(data: DataSpec) -> DataSpec:
    """The spec with its synthetic slides written and listed as plain slides, so workers only read."""
    if not data.synthetic_seeds:
        return data
    return data.model_copy(update={"slides": data.slides + synthetic_slides(data), "synthetic_seeds": []})


def fit(settings: TrainSettings, data: DataSpec, out: str | Path, *, log: Callable[[str], None] = print) -> CellSAM:
    """Train in-process; ``out`` receives ``cellsam.pt``, ``config.json`` and ``losses.jsonl``. The model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    net = initial_model(settings)
    freeze_parts(net, settings)
    size = net.config.image_size
    tiles = [prepare_tile(image, size) for image in load_images(materialise(data), size)]
    log(f"{len(tiles)} labelled tiles of {size}² px; training on {device}")
    objective = Objective(net, settings).to(device)
    log_path = out / LOG_NAME
    log_path.write_text("")

    def report(step: int, means: dict[str, float], last: bool) -> None:
        log(format_losses(step, settings.steps, means))
        with log_path.open("a") as f:
            f.write(json.dumps({"step": step, **means}) + "\n")
        if last or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
            save_checkpoint(net, out)

    run_steps(objective, net, tiles, settings, report)
    log(f"checkpoint: {out / CHECKPOINT_NAME}")
    return net.eval()


def format_losses(step: int, steps: int, means: dict[str, float]) -> str:
    shown = " ".join(f"{k} {means[k]:.4f}" for k in ("loss", "classification", "l1", "giou", "mask_bce",
                                                       "mask_dice", "mask_iou") if k in means)
    return f"step {step}/{steps}  {shown}  ({means['seconds_per_step']:.2f} s/step)"
