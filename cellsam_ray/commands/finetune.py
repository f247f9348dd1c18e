"""``cellsam-ray finetune OUT``: few-shot fine-tuning of a CellSAM checkpoint on a few labelled tiles.

The same training as ``train``, with defaults for a few tiles: it starts from a checkpoint (by default
the bundled demo model), takes fewer, gentler steps, and ``--max-tiles N`` keeps N tiles of the data.
The model config is the one beside the checkpoint (``config.json``) unless ``--config`` names another.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cellsam_ray.commands import train as train_command

HELP = "Fine-tune a CellSAM checkpoint (default: the bundled demo model) on a few labelled tiles."

DEFAULTS = {"init": None, "config": None, "steps": 60, "batch_size": 2, "lr": 3e-4, "lr_trunk": 3e-4, "warmup": 5,
            "masks_per_image": 8, "log_every": 10, "validation_tiles": 2, "in_process": True}
"""The settings ``tests/test_few_shot.py`` measured an improvement with (8 tiles, 2 held back, bundled model);
in this process by default (``--no-in-process`` for Ray Train workers, without the validation split)."""
HELPS = {
    "init": "Checkpoint to start from (default: the bundled demo model).",
    "config": "Model sizes of that checkpoint (default: its config.json, else v1.2).",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_command.add_arguments(parser, DEFAULTS, HELPS)


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.model import bundled
    from cellsam_ray.train.loop import TrainSettings

    init = args.init or str(bundled.WEIGHTS)
    config = args.config
    if config is None:
        beside = Path(init).with_name("config.json")
        config = str(bundled.CONFIG) if init == str(bundled.WEIGHTS) else str(beside) if beside.is_file() else "v1.2"
    if init == str(bundled.WEIGHTS):
        print(f"starting from {bundled.DESCRIPTION}")
    settings = train_command.build(TrainSettings, args, {"init": init, "config": config})
    return train_command.train(settings, args)
