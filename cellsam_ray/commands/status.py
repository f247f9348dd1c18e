"""``cellsam-ray status JOB``: where a submitted job stands (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""

from __future__ import annotations

import argparse

from cellsam_ray.jobclient import ADDRESS_HELP

HELP = "Show a submitted job's status (and why it failed, if it did)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", metavar="JOB", help="The id `cellsam-ray submit` printed.")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.jobclient import JobApi

    info = JobApi(args.address).info(args.job_id)
    print(f"{args.job_id} {info.status.value}")
    if info.message:
        print(" ".join(info.message.split()))
    return 0
