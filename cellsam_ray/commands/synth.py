"""``cellsam-ray synth``: write a synthetic multiplexed tissue slide with ground-truth cells."""

from __future__ import annotations

import argparse

from cellsam_ray.io.storage import parse_storage_options
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.synth.styles import STYLES

HELP = "Write a synthetic slide of one style (OME-Zarr, with labels/ground_truth) for tests, demos and training."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT_URL", help="Where to write: a local path or fsspec URL (s3://...).")
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=(2048, 2048),
                        help="Height and width in pixels at level 0 (default 2048 2048).")
    parser.add_argument("--style", default="tissue", choices=STYLES,
                        help="What to draw (default tissue, the multiplexed tissue model); see "
                        "cellsam_ray/synth/styles.py for each style's cells, channels and roles.")
    parser.add_argument("--channels", type=int, default=None,
                        help="tissue style only: number of channels: DAPI, a membrane marker, a cytoplasm "
                        "marker, then more (default 3).")
    parser.add_argument("--ngff", default="0.5", help="NGFF version: 0.4 (zarr v2) or 0.5 (zarr v3; default).")
    parser.add_argument("--seed", type=int, default=0, help="The slide is a pure function of the seed (default 0).")
    parser.add_argument("--chunk", type=int, default=512, help="Chunk size in pixels (default 512).")
    parser.add_argument("--pixel-size", type=float, default=0.5, help="Micrometres per pixel at level 0 (default 0.5).")
    parser.add_argument("--workers", type=int, default=1, help="Threads rendering chunks (default 1).")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help='fsspec storage options as a JSON object, e.g. \'{"endpoint_url": "http://..."}\'.')


def run(args: argparse.Namespace) -> int:
    info = write_synthetic_slide(
        args.out,
        size=tuple(args.size),
        channels=args.channels,
        ngff=args.ngff,
        seed=args.seed,
        chunk=args.chunk,
        pixel_size=args.pixel_size,
        storage_options=parse_storage_options(args.storage_options),
        workers=args.workers,
        style=args.style,
    )
    c, h, w = info.shape
    print(f"wrote {info.url} ({args.style}): NGFF {info.ngff}, {c} channels ({', '.join(info.channel_names)}), "
          f"{h}x{w} px at {info.pixel_size} um, {info.levels} levels, labels/{info.label_name}, in {info.seconds:.1f} s")
    return 0
