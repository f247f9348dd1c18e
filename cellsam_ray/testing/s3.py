"""A real S3-compatible server for tests and demos: moto's HTTP server on 127.0.0.1, with the environment
that keeps every AWS client on it (nothing can reach AWS). moto comes with the ``test`` extra."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from cellsam_ray.io.storage import join_url


TEST_CREDENTIALS = {"key": "testing", "secret": "testing"}


# Where boto/s3fs go before a local server is known: a closed local port, so nothing can reach AWS.
NOWHERE = "http://127.0.0.1:9"


def safe_aws_environment(endpoint_url: str = NOWHERE) -> dict[str, str]:
    """Environment that keeps every AWS client (boto, s3fs, ome-zarr-py's bare ``s3://``) on ``endpoint_url``
    with fake credentials; ``os.environ.update`` it before anything creates a client."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["key"],
        "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
    }


def spec_storage(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Spec fields that reach the storage ``storage_options`` reach, as a user must write them: the plain
    options inline, the credentials named as environment variables (``safe_aws_environment`` sets them,
    and every process of the run reads them from its own environment)."""
    if not storage_options:
        return {}
    plain = {k: v for k, v in storage_options.items() if k not in TEST_CREDENTIALS}
    return {"storage_options": plain or None,
            "storage_options_env": {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY"}}


class LocalS3:
    """A moto S3 server on 127.0.0.1 (a free port) with one bucket; use as a context manager.

    Everything is kept in the server's memory, so use one per test session or demo (stack.md 3.3).
    The bucket is created without a region (a LocationConstraint is refused: stack.md 3.2).
    """

    def __init__(self, bucket: str = "test-bucket") -> None:
        self.bucket = bucket
        self._server: Any = None
        self.endpoint_url = ""

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server."""
        return {**TEST_CREDENTIALS, "endpoint_url": self.endpoint_url}

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return join_url(f"s3://{self.bucket}", *parts)

    def unique_url(self, name: str = "data") -> str:
        """A fresh prefix nobody else writes to."""
        return self.url(f"{name}-{uuid.uuid4().hex[:8]}")

    def start(self) -> LocalS3:
        import s3fs
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True).mkdir(self.bucket)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
