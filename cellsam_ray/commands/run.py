"""``cellsam-ray run SPEC``: run a job spec (YAML or JSON, a path or URL) from here.

What ``jobs/segment.py`` and ``cellsam-ray submit`` run inside a Ray job: the spec is read and checked,
the local paths it names are checked on this node (a spec submitted from another machine names that
machine's paths), the slide is planned, and the run joins the cluster with a plain ``ray.init()`` (inside a Ray job that is
the job's cluster; elsewhere ``RAY_ADDRESS`` or a new local one). Progress goes to stderr, as a bar on a
terminal and as ``PROGRESS {json}`` lines in job logs; the summary is printed as JSON at the end.
"""

from __future__ import annotations

import argparse
import json

HELP = "Run a job spec (YAML or JSON) on the Ray cluster this process joins, or a local one."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="The job spec: a local path or URL (s3://...), YAML or JSON.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar or PROGRESS lines.")


def run(args: argparse.Namespace) -> int:
    from cellsam_ray.jobspec import load_job_spec, require_local_paths
    from cellsam_ray.driver.api import segment

    spec = load_job_spec(args.spec)
    require_local_paths(spec)
    report = segment(spec, progress=not args.no_progress)
    print(json.dumps(report["summary"], indent=2), flush=True)
    return 0
