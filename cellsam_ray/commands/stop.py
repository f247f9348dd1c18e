"""``cellsam-ray stop JOB``: stop a submitted job; what it finished is kept, so resubmitting its spec resumes."""

from __future__ import annotations

import argparse
import sys

from cellsam_ray.jobclient import add_job_arguments

HELP = "Stop a submitted job (finished tiles are kept: submitting the same spec again resumes it)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.jobclient import JobApi

    info = JobApi(args.address).stop(args.job_id)
    if not info.status.is_terminal():
        print(f"cellsam-ray: job {args.job_id} is still {info.status.value} a minute after the stop request",
              file=sys.stderr)
        return 1
    print(f"{args.job_id} {info.status.value}")
    return 0
