"""``cellsam-ray status JOB``: where a submitted job stands (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED).

The exit status says it too, for scripts: 0 while it is pending or running and once it succeeded, 1 for a
failed or stopped job.
"""

from __future__ import annotations

import argparse

from cellsam_ray.jobclient import add_job_arguments

HELP = "Show a submitted job's status (and why it failed, if it did)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.jobclient import JobApi

    from ray.job_submission import JobStatus

    info = JobApi(args.address).info(args.job_id)
    print(f"{args.job_id} {info.status.value}")
    if info.message:
        print(" ".join(info.message.split()))
    return 1 if info.status in (JobStatus.FAILED, JobStatus.STOPPED) else 0
