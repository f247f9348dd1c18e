"""``cellsam-ray submit SPEC``: run a job spec on a Ray cluster through its Job Submission API.

The spec is read and checked here, so a typo fails before it reaches the cluster. It travels in the job's
``runtime_env`` (a working folder holding ``spec.json``, with relative local paths made absolute) and
runs there as ``cellsam-ray run spec.json``: cellsam-ray must be installed on every node. Nothing else
travels, not this shell's environment either: a segmenter's settings are in the spec
(``segmenter_options``), and storage credentials are variables of the cluster's nodes, which
``storage_options_env`` names (a job's runtime_env is kept by Ray and shown by its dashboard). The nodes run
the image cellsam-ray is installed in (``deploy/``). Local paths in a spec sent to another machine get a
one-line note here; the job's first check (``cellsam-ray run``) names any its node lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from cellsam_ray.jobclient import ADDRESS_HELP

HELP = "Submit a job spec to a Ray cluster and print the job id; --wait follows it and exits with its status."
ENTRYPOINT = "python -m cellsam_ray.cli run spec.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="The job spec: a local path or URL, YAML or JSON.")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    parser.add_argument("--wait", action="store_true",
                        help="Stream the job's log (with its PROGRESS lines) and exit with its status.")
    parser.add_argument("--job-id", default=None, help="Submission id to use (default: Ray makes one).")


def _on_this_machine(address: str | None) -> bool:
    """Whether the job API at ``address`` (or the one the environment names) is on this machine."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "127.0.0.1"
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or "127.0.0.1"
    return host in ("127.0.0.1", "localhost", "::1")


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.jobclient import JobApi
    from cellsam_ray.jobspec import load_job_spec, named_paths, portable_fields

    spec = load_job_spec(args.spec)
    fields = portable_fields(spec)
    local = spec.with_local_paths_absolute().local_paths()
    if local and not _on_this_machine(args.address):
        print(f"cellsam-ray: note: the spec names local paths ({named_paths(local)}): they must exist on the "
              "cluster's nodes (the job checks before any model starts); URLs (s3://...) reach them from anywhere",
              file=sys.stderr, flush=True)
    api = JobApi(args.address)
    with tempfile.TemporaryDirectory(prefix="cellsam-job-") as folder:
        Path(folder, "spec.json").write_text(json.dumps(fields, indent=2))
        job_id = api.submit(entrypoint=ENTRYPOINT, submission_id=args.job_id,
                            runtime_env={"working_dir": folder},
                            metadata={"spec": str(args.spec), "input": _named(fields["input"])})
    print(job_id, flush=True)
    return api.wait(job_id) if args.wait else 0


def _named(given: str | list[str]) -> str:
    """The input, in the one string a job's metadata holds: a cohort's first slide and how many more."""
    if isinstance(given, str):
        return given
    return given[0] if len(given) == 1 else f"{given[0]} and {len(given) - 1} more"
