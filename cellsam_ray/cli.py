"""The ``cellsam-ray`` command line.

Each subcommand lives in its own module under ``cellsam_ray.commands`` and offers ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Only commands listed in ``COMMANDS`` are shown, so
``--help`` lists exactly what works.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from cellsam_ray.errors import RunFailed, RunStopped, UserError, one_line

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
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an unexpected error.")
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
    """Run one command; whatever goes wrong ends as one line on stderr and a non-zero exit (2: bad input,
    1: the run failed, 130: stopped), with the traceback only under ``--debug``."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"cellsam-ray: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"cellsam-ray: {err}", file=sys.stderr)
        return 130
    except RunFailed as err:
        if args.debug:
            traceback.print_exc()
        print(f"cellsam-ray: failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cellsam-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a user sees one line, never a traceback, unless they ask
        if args.debug:
            traceback.print_exc()
        print(f"cellsam-ray: unexpected error: {one_line(err)} (rerun with "
              "--debug for the traceback; a segment run's report.json says how far it came)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
