"""``cellsam-ray segment``: segment a whole slide on Ray and write labels/<name> into it.

The options are generated from ``SegmentSpec``, so the command line, the Python API and job specs take
the same fields with the same defaults. Without ``--weights`` (and ``--segmenter``) the bundled demo model
segments, with its own tiling unless ``--tile``/``--halo``/``--chunk`` are given.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing

from cellsam_ray.commands.fields import base_type, option_flag
from cellsam_ray.errors import UserError
from cellsam_ray.io.storage import parse_storage_options
from cellsam_ray.spec import SegmentSpec, validate_spec

HELP = "Segment every cell of an OME-Zarr slide on Ray and write labels/<name> into it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", help=SegmentSpec.model_fields["input"].description)
    for name, info in SegmentSpec.model_fields.items():
        if name == "input":
            continue
        flag = option_flag(info.alias or name)
        kind = base_type(info.annotation)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        help_text = f"{info.description} (default: {default})" if default not in (None, [], {}) else info.description
        if name == "segmenter_options":  # one option per flag: KEY=VALUE reads better than a JSON object
            parser.add_argument("--segmenter-option", dest=name, action="append", default=None, metavar="KEY=VALUE",
                                help=f"{info.description} VALUE is read as JSON when it is JSON (5, 0.5, true, "
                                "null, \"5\"), else taken as a string.")
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=name, default=None, metavar="NAME[,NAME...]",
                                help=help_text, required=info.is_required())
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, dest=name, default=None, choices=typing.get_args(kind), help=help_text)
        elif kind is dict or typing.get_origin(kind) is dict:
            parser.add_argument(flag, dest=name, default=None, metavar="JSON", help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, type=kind if kind in (int, float) else str,
                                help=help_text)
    parser.add_argument("--no-progress", action="store_true", help="No progress bar on the terminal.")


def spec_from_args(args: argparse.Namespace) -> SegmentSpec:
    values: dict = {"input": args.input[0] if len(args.input) == 1 else args.input}
    for name, info in SegmentSpec.model_fields.items():
        value = getattr(args, name, None)
        if name == "input" or value is None:
            continue
        if name in ("nuclear", "whole_cell"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif name in ("storage_options", "storage_options_env"):
            value = parse_storage_options(value, option_flag(name), names_only=name == "storage_options_env")
        elif name == "segmenter_options":
            value = parse_segmenter_options(value)
        values[info.alias or name] = value
    return validate_spec(values, lambda where: "--segmenter-option" if where.startswith("segmenter_options")
                         else f"--{where.replace('_', '-')}")


def parse_segmenter_options(items: list[str]) -> dict:
    """``--segmenter-option KEY=VALUE`` items as a mapping: VALUE parsed as JSON when it parses (numbers,
    true, false, null, quoted strings), else kept as written, so paths and words need no quotes."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--segmenter-option {item!r} must look like KEY=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options[key.strip()] = value
    return options


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.model import bundled
    from cellsam_ray.driver.api import segment

    spec = spec_from_args(args)
    if not (spec.weights or spec.segmenter):
        print(f"no --weights given: segmenting with {bundled.DESCRIPTION}", file=sys.stderr)
    report = segment(spec, progress=not args.no_progress)
    print(json.dumps(report["summary"], indent=2))
    return 0
