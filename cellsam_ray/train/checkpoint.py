"""Saving a trained CellSAM so that everything that loads a CellSAM checkpoint loads it.

The file is a plain tensor state dict in the v1.2 key layout of the model's config (``load_cellsam``
loads it strictly, ``torch.load(weights_only=True)`` reads it). Training updates only ``model_cp``, the
SAM branch inference uses; the legacy ``model`` branch, which the layout also holds, is saved as the
same tensors, so it stays consistent and the file holds the SAM weights once (``torch.save`` stores a
shared storage once, as it does for CellFinder's aliased heads).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from cellsam_ray.model.network import CellSAM

CHECKPOINT_NAME = "cellsam.pt"
CONFIG_NAME = "config.json"


def checkpoint_state(net: CellSAM) -> dict[str, Tensor]:
    """``net``'s state dict on the CPU with ``model.*`` aliased to ``model_cp.*``."""
    state = {key: value.detach().cpu() for key, value in net.state_dict().items()}
    for key in state:
        if key.startswith("model."):
            state[key] = state["model_cp." + key.removeprefix("model.")]
    return state


def save_checkpoint(net: CellSAM, folder: str | Path) -> Path:
    """Write ``cellsam.pt`` and its ``config.json`` into ``folder`` (atomically); the checkpoint's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_NAME
    partial = folder / f".{CHECKPOINT_NAME}.part"
    torch.save(checkpoint_state(net), partial)
    os.replace(partial, target)
    (folder / CONFIG_NAME).write_text(net.config.model_dump_json(indent=1) + "\n")
    return target
