"""``cellsam-ray logs JOB``: a submitted job's log (progress lines, the summary, errors)."""

from __future__ import annotations

import argparse
import sys

from cellsam_ray.jobclient import ADDRESS_HELP

HELP = "Print a submitted job's log; --follow streams it until the job ends."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", metavar="JOB", help="The id `cellsam-ray submit` printed.")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    parser.add_argument("--follow", action="store_true", help="Keep streaming until the job ends.")


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.jobclient import JobApi

    api = JobApi(args.address)
    if args.follow:
        api.stream_logs(args.job_id)
    else:
        sys.stdout.write(api.logs(args.job_id))
    return 0
