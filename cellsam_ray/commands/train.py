"""``cellsam-ray train OUT``: train CellSAM (from scratch or any checkpoint) on labelled tiles.

Options are generated from ``TrainSettings`` and ``DataSpec``, so the command line and the Python API
take the same fields with the same defaults. Training runs as Ray Train workers (``--workers``,
``--gpu``); ``--in-process`` runs the same loop here without Ray.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from cellsam_ray.commands.fields import base_type, option_flag
from cellsam_ray.errors import UserError

HELP = "Train CellSAM on labelled tiles (OME-Zarr slides with labels, image+label folders or synthetic tissue)."

DATA_HELP = {"slides": "OME-Zarr slide with a label image (repeat for more).",
             "synthetic_seeds": "Generate synthetic slides with these seeds and train on them."}
LIST_OPTIONS = {"slides": ("slide", "URL"), "synthetic_seeds": ("synthetic", "SEED"), "freeze": ("freeze", "PART")}
"""List fields: their (singular) option names and metavars."""


def add_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                  helps: dict[str, str] | None = None) -> None:
    """Every option; ``defaults`` and ``helps`` override fields' defaults and descriptions (for finetune)."""
    from cellsam_ray.train.data import DataSpec
    from cellsam_ray.train.loop import TrainSettings

    parser.add_argument("out", metavar="OUT", help="Folder for cellsam.pt, config.json and losses.jsonl.")
    helps = {**DATA_HELP, **(helps or {})}
    add_model_options(parser.add_argument_group("data"), DataSpec, skip={"synthetic_dir"}, defaults=defaults,
                      helps=helps)
    add_model_options(parser.add_argument_group("training"), TrainSettings, skip=set(), defaults=defaults,
                      helps=helps)
    run = parser.add_argument_group("where it runs")
    run.add_argument("--workers", type=int, default=1, help="Ray Train workers, data-parallel (default 1).")
    run.add_argument("--gpu", action="store_true", help="One GPU per worker.")
    run.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default: the cluster's, shared).")
    run.add_argument("--storage-path", help="Where Ray Train keeps checkpoints; shared storage on a multi-node "
                     "cluster (default: OUT/ray).")
    in_process = (defaults or {}).get("in_process", False)
    run.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=in_process,
                     help=f"Train in this process, without Ray (default: {'on' if in_process else 'off'}).")


def add_model_options(group, model: type[BaseModel], *, skip: set[str], defaults: dict[str, Any] | None,
                      helps: dict[str, str]) -> None:
    """One option per field of ``model``: ``--field-name``, typed, with the field's description."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        option, metavar = LIST_OPTIONS.get(name, (name, None))
        flag = option_flag(option)
        default = (defaults or {}).get(name, info.get_default(call_default_factory=True))
        kind = base_type(info.annotation)
        text = helps.get(name, info.description)
        text += f" (default: {default})" if default not in (None, [], {}) and "(default" not in text else ""
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            choices = typing.get_args(item) if typing.get_origin(item) is typing.Literal else None
            if name in ("nuclear", "whole_cell"):
                group.add_argument(flag, dest=name, default=default, metavar="NAME[,NAME...]",
                                   type=lambda text: [v.strip() for v in text.split(",") if v.strip()], help=text)
            else:
                group.add_argument(flag, dest=name, action="extend", nargs="+", default=None, choices=choices,
                                   metavar=metavar, type=item if item in (int, str) else str,
                                   help=text + (f" One of: {', '.join(choices)}." if choices else ""))
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(flag, dest=name, default=default, choices=typing.get_args(kind), help=text)
        elif kind is dict:
            group.add_argument(flag, dest=name, default=default, metavar="JSON", help=text)
        else:
            group.add_argument(flag, dest=name, default=default, type=kind if kind in (int, float) else str,
                               help=text)


def build(model: type[BaseModel], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Any:
    """``model`` validated from the parsed options; a validation problem is one UserError line."""
    from cellsam_ray.io.storage import parse_storage_options

    values = {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
    if "storage_options" in values:
        values["storage_options"] = parse_storage_options(values["storage_options"])
    values.update(extra or {})
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise UserError(f"--{where.replace('_', '-')}: {message}" if where else message) from None


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.train.loop import TrainSettings

    return train(build(TrainSettings, args), args)


def train(settings, args: argparse.Namespace) -> int:
    """Build the data spec from ``args`` and train with ``settings``, in-process or on Ray Train."""
    from pathlib import Path

    from cellsam_ray.train.data import DataSpec

    data = build(DataSpec, args, {"synthetic_dir": str(Path(args.out, "synthetic"))})
    if args.in_process:
        from cellsam_ray.train.fit import fit

        fit(settings, data, args.out)
    else:
        from cellsam_ray.train.distributed import fit_distributed

        if args.workers < 1:
            raise UserError("--workers must be at least 1")
        if settings.resume or settings.validation_tiles:
            raise UserError("--resume and --validation-tiles train in this process: add --in-process")
        fit_distributed(settings, data, args.out, workers=args.workers, use_gpu=args.gpu,
                        cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path)
    return 0


