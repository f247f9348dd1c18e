"""Talking to a Ray cluster's Job Submission API (the dashboard, port 8265): submit, status, logs, stop.

Shared by ``cellsam-ray submit``, ``status``, ``logs`` and ``stop``, so the errors a user can act on (no dashboard at
that address, a token the cluster wants, a job id that does not exist) become one-line ``UserError``s in
one place. Token authentication is Ray's own: with ``RAY_AUTH_MODE=token`` set, the client sends the token
from ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from cellsam_ray.errors import UserError

ADDRESS_HELP = "The Ray dashboard's URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)."


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """JOB and --address, for the commands about one submitted job (status, logs, stop)."""
    parser.add_argument("job_id", metavar="JOB", help="The id `cellsam-ray submit` printed.")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)


class JobApi:
    """The cluster's job API at ``address`` (None: from the environment, as Ray's own CLI does)."""

    def __init__(self, address: str | None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address
        with self._user_errors():
            self.client = JobSubmissionClient(address)

    @contextmanager
    def _user_errors(self) -> Iterator[None]:
        from ray.exceptions import AuthenticationError

        where = self.address or "the address in $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS"
        try:
            yield
        except AuthenticationError:
            raise UserError(f"the Ray cluster at {where} wants a token: set RAY_AUTH_MODE=token, with the "
                            "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
        except ConnectionError as err:
            raise UserError(f"cannot reach a Ray dashboard at {where} ({str(err).splitlines()[0]}): is the "
                            "head node up, started with the dashboard, and is ray[default] installed?") from None
        except RuntimeError as err:  # the SDK's wrapper for HTTP errors, e.g. 404 for an unknown job id
            raise UserError(f"Ray job API at {where}: {str(err).splitlines()[0]}") from None

    def submit(self, **kwargs) -> str:
        with self._user_errors():
            return self.client.submit_job(**kwargs)

    def info(self, job_id: str):
        with self._user_errors():
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with self._user_errors():
            return self.client.get_job_logs(job_id)

    def stop(self, job_id: str, timeout: float = 60):
        """Ask the job to stop and wait (up to ``timeout`` s) until it has; returns its info then."""
        with self._user_errors():
            self.client.stop_job(job_id)
        deadline = time.monotonic() + timeout
        while not (info := self.info(job_id)).status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
        return info

    def stream_logs(self, job_id: str) -> None:
        """Copy the job's log to stdout as it is written, until the job ends."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        with self._user_errors():
            asyncio.run(tail())

    def wait(self, job_id: str) -> int:
        """Follow the job to its end, its log on stdout; 0 if it succeeded, else 1 with its status on stderr."""
        from ray.job_submission import JobStatus

        try:
            self.stream_logs(job_id)
            while not (info := self.info(job_id)).status.is_terminal():
                time.sleep(1)
        except KeyboardInterrupt:
            print(f"\nstopped following; job {job_id} goes on: cellsam-ray status {job_id}", file=sys.stderr)
            return 130
        if info.status == JobStatus.SUCCEEDED:
            return 0
        message = " ".join((info.message or "").split())
        print(f"cellsam-ray: job {job_id} {info.status.value}: {message}", file=sys.stderr)
        return 1
