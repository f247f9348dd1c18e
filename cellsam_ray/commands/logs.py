"""``cellsam-ray logs JOB``: a submitted job's log (progress lines, the summary, errors)."""

from __future__ import annotations

import argparse
import sys

from cellsam_ray.jobclient import add_job_arguments

HELP = "Print a submitted job's log; --follow streams it until the job ends."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--follow", action="store_true", help="Keep streaming until the job ends.")


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.jobclient import JobApi

    api = JobApi(args.address)
    if args.follow:
        api.stream_logs(args.job_id)
    else:
        sys.stdout.write(api.logs(args.job_id))
    return 0
