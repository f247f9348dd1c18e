"""Real parts for tests and demos: a local S3 server, a local Ray cluster, and the OME-Zarr validator.

No mocks: the S3 server is moto's real HTTP server on 127.0.0.1, the cluster is a real Ray node, and
validation is ome-zarr-models, the reference validator. moto and ome-zarr-models come with the ``test``
extra, so they are imported only when used.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import zarr

from cellsam_ray.io.storage import join_url, open_group

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


def safe_ray_environment() -> dict[str, str]:
    """Environment for a local Ray node that listens on loopback only and phones nowhere (stack.md 5.3)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


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


def start_local_ray(num_cpus: int = 2) -> None:
    """A self-contained local Ray node (``address="local"`` never joins a leftover cluster), no dashboard."""
    import ray

    os.environ.update(safe_ray_environment())
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)


class InvalidOmeZarr(AssertionError):
    """ome-zarr-models rejected a dataset; the message is the validator's."""


def validate_ome_zarr(url_or_group: str | zarr.Group, storage_options: dict[str, Any] | None = None) -> Any:
    """Validate an OME-Zarr image (with its ``labels/``) or label image with ome-zarr-models.

    Returns the validated model (``v04.Image``, ``v05.ImageLabel``, ...); raises InvalidOmeZarr with the
    validator's message otherwise. The NGFF version is taken from the zarr format (0.4 = v2, 0.5 = v3).
    """
    from ome_zarr_models import v04, v05

    if isinstance(url_or_group, zarr.Group):
        group, where = url_or_group, str(url_or_group.store)
    else:
        group, where = open_group(url_or_group, storage_options, mode="r"), url_or_group
    models = v04 if group.metadata.zarr_format == 2 else v05
    attrs = dict(group.attrs)
    ome = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    model = models.ImageLabel if "image-label" in ome else models.Image
    try:
        return model.from_zarr(group)
    except Exception as err:  # noqa: BLE001 - pydantic, ValueError, RuntimeError: all mean "invalid"
        raise InvalidOmeZarr(f"{where} is not a valid {model.__module__}.{model.__name__}: {err}") from err
