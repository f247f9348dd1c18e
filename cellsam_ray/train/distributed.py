"""Data-parallel training on Ray Train: the same loop, one process per worker, gradients all-reduced.

``TorchTrainer`` starts ``workers`` processes (one GPU each with ``use_gpu``), sets up the torch process
group and wraps the objective in DistributedDataParallel. Each worker trains on its own share of the
tiles (tile i goes to worker i mod N) with the same initial weights; the losses are normalised by the
mean cell count across workers, so N workers with batch B step like one with batch N·B. Worker 0
reports the checkpoint, which Ray Train persists under ``storage_path`` (shared storage on a
multi-node cluster) and which is then copied to the output folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from cellsam_ray.train.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, save_checkpoint
from cellsam_ray.train.data import DataSpec, prepare_tile
from cellsam_ray.train.fit import LOG_NAME, format_losses, materialise
from cellsam_ray.train.loop import Objective, TrainSettings, freeze_parts, initial_model, run_steps
from cellsam_ray.train.sources import load_images


def fit_distributed(
    settings: TrainSettings,
    data: DataSpec,
    out: str | Path,
    *,
    workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
    storage_path: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train on ``workers`` Ray Train workers; ``out`` receives ``cellsam.pt``, ``config.json`` and the loss log.

    Joins the Ray cluster the environment names, else starts a local one. ``cpus_per_worker`` defaults
    to the cluster's CPUs shared evenly (all of this machine's cores for one local worker);
    ``storage_path`` to ``out/ray``, which must be shared storage when workers span several nodes.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cellsam_ray.driver.api import ensure_ray

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = materialise(data)  # synthetic slides are written once, here, not by every worker
    ensure_ray()
    if cpus_per_worker is None:
        cpus_per_worker = max(1.0, ray.cluster_resources().get("CPU", 1.0) // workers)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"settings": settings.model_dump(), "data": data.model_dump()},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name="cellsam-train", storage_path=storage_path or str(out / "ray")),
    )
    log(f"training on {workers} Ray Train worker(s), {'one GPU' if use_gpu else f'{cpus_per_worker:g} CPUs'} each")
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        for name in (CHECKPOINT_NAME, CONFIG_NAME, LOG_NAME):
            shutil.copyfile(Path(folder, name), out / name)
    log(f"checkpoint: {out / CHECKPOINT_NAME}")
    return out / CHECKPOINT_NAME


def _worker(config: dict) -> None:
    """One Ray Train worker: its share of the tiles, the wrapped objective, reports at every log step."""
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, round(cpus)))  # Ray sets 1 thread for fractional CPU shares
    settings = TrainSettings.model_validate(config["settings"])
    data = DataSpec.model_validate(config["data"])
    net = initial_model(settings)  # the same seed on every worker, and DDP broadcasts rank 0's weights
    freeze_parts(net, settings)
    size = net.config.image_size
    tiles = [prepare_tile(image, size) for image in load_images(data, size)[rank::world]]
    objective = ray.train.torch.prepare_model(
        Objective(net, settings), parallel_strategy_kwargs={"find_unused_parameters": True})
    history: list[dict] = []

    def report(step: int, means: dict[str, float], last: bool) -> None:
        history.append({"step": step, **means})
        checkpoint_now = last or bool(settings.checkpoint_every and step % settings.checkpoint_every == 0)
        if rank == 0:
            print(format_losses(step, settings.steps, means), flush=True)
        if not (checkpoint_now and rank == 0):
            ray.train.report(means)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(net, folder)
            Path(folder, LOG_NAME).write_text("".join(json.dumps(h) + "\n" for h in history))
            ray.train.report(means, checkpoint=ray.train.Checkpoint.from_directory(folder))

    run_steps(objective, net, tiles, settings, report, rank=rank)
