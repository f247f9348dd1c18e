"""The ``cellsam-ray`` command line.

Each subcommand lives in its own module under ``cellsam_ray.commands`` and offers ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Only commands listed in ``COMMANDS`` are shown, so
``--help`` lists exactly what works.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cellsam_ray.errors import RunFailed, UserError

# subcommand name -> module under cellsam_ray.commands
COMMANDS: dict[str, str] = {
    "synth": "synth",
    "segment-image": "segment_image",
    "segment": "segment",
    "demo": "demo",
    "bench": "bench",
    "evaluate": "evaluate_cmd",
    "train": "train",
    "finetune": "finetune",
    "run": "run",
    "submit": "submit",
    "status": "status",
    "logs": "logs",
    "stop": "stop",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, with ``only``, one that imports just that command's module: some
    commands import torch at load time, and ``cellsam-ray status`` should not wait for it."""
    parser = argparse.ArgumentParser(
        prog="cellsam-ray",
        description="Distributed CellSAM cell segmentation of OME-Zarr slides, on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(f"cellsam_ray.commands.{module_name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"cellsam-ray: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"cellsam-ray: failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
