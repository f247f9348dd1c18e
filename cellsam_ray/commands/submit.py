"""``cellsam-ray submit SPEC``: run a job spec on a Ray cluster through its Job Submission API.

The spec is read and checked here, so a typo fails before it reaches the cluster. It travels in the job's
``runtime_env`` (a working folder holding ``spec.json``, with relative local paths made absolute) and
runs there as ``cellsam-ray run spec.json``: cellsam-ray must be installed on every node. Variables
``CELLSAM_RAY_*`` of this shell go with it (segmenters built with no arguments read their settings from
them), but not those whose names say they hold a secret (``segmenter.segmenter_environment``), nor storage
credentials: ``storage_options_env`` names variables of the cluster's nodes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cellsam_ray.jobclient import ADDRESS_HELP

HELP = "Submit a job spec to a Ray cluster and print the job id; --wait follows it and exits with its status."
ENTRYPOINT = "python -m cellsam_ray.cli run spec.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="The job spec: a local path or URL, YAML or JSON.")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    parser.add_argument("--wait", action="store_true",
                        help="Stream the job's log (with its PROGRESS lines) and exit with its status.")
    parser.add_argument("--job-id", default=None, help="Submission id to use (default: Ray makes one).")


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.jobclient import JobApi
    from cellsam_ray.jobspec import load_job_spec, portable_fields
    from cellsam_ray.segmenter import segmenter_environment

    fields = portable_fields(load_job_spec(args.spec))
    api = JobApi(args.address)
    env = segmenter_environment()
    with tempfile.TemporaryDirectory(prefix="cellsam-job-") as folder:
        Path(folder, "spec.json").write_text(json.dumps(fields, indent=2))
        job_id = api.submit(entrypoint=ENTRYPOINT, submission_id=args.job_id,
                            runtime_env={"working_dir": folder, "env_vars": env},
                            metadata={"spec": str(args.spec), "input": fields["input"]})
    print(job_id, flush=True)
    return api.wait(job_id) if args.wait else 0
