"""``cellsam-ray bench``: pipeline efficiency, throughput and memory on synthetic slides."""

from __future__ import annotations

import argparse
import json

HELP = "Benchmark the whole-slide pipeline against the model alone on synthetic slides."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048], help="Slide sizes in pixels (default: 2048).")
    parser.add_argument("--config", default="v1.2", help="Model sizes: v1.2 or a JSON config (default: v1.2).")
    parser.add_argument("--weights", default=None, help="Checkpoint (default: random weights of --config).")
    parser.add_argument("--tile", type=int, help="Tile core (default: as `segment` decides it from the model).")
    parser.add_argument("--halo", type=int, help="Context around a core (default: as `segment` decides it).")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default=None, help="Also write the results to this JSON file.")


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.bench.pipeline import run_bench

    result = run_bench(args.sizes, args.config, args.weights, tile=args.tile, halo=args.halo,
                       batch_size=args.batch_size, out=args.out)
    print(json.dumps(result, indent=2))
    return 0
