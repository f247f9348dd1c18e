"""Real parts for tests and demos: a local S3 server, a local Ray cluster, the OME-Zarr validator, and the
shared reference data (golden checkpoint, inputs and the published code's outputs).

No mocks: the S3 server is moto's real HTTP server on 127.0.0.1, the cluster is a real Ray node, and
validation is ome-zarr-models, the reference validator. moto and ome-zarr-models come with the ``test``
extra, so they are imported only when used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNodes:
    """A real multi-node Ray cluster on this machine: ``ray start --head`` and ``ray start --address`` workers.

    Each node is a ``ray start --block`` process in its own session, so stopping it (SIGTERM, then SIGKILL
    of its process group) takes down exactly its raylet, GCS and dashboard, never another cluster on the
    machine (``ray stop`` would stop them all). Each node has its own short temp dir (Unix socket paths
    are limited to 107 bytes), so ``/tmp/ray/ray_current_cluster`` is never written for others to join.

    The dashboard listens on 127.0.0.1 only. The nodes themselves use the address Ray picks for this
    machine: a worker node refuses to join with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's single-node
    loopback mode), and with it on, Ray resolves 127.0.0.1 to the machine's routable address.
    """

    def __init__(self, cpus: tuple[int, ...] = (1, 1), env: dict[str, str] | None = None) -> None:
        self.cpus = cpus
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    **(env or {})}
        self.root = Path(tempfile.mkdtemp(prefix="crn", dir="/tmp"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.processes: list[subprocess.Popen] = []

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.processes.append(subprocess.Popen(
            ["ray", "start", "--block", "--disable-usage-stats", f"--temp-dir={self.root / name}",
             f"--dashboard-agent-listen-port={free_port()}", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self, timeout: float = 120) -> "RayNodes":
        self._start("head", ["--head", f"--port={self.gcs_port}", f"--num-cpus={self.cpus[0]}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"])
        self._wait_for(lambda: "Ray runtime started" in self.log("head"), timeout, "the head node")
        for i, cpus in enumerate(self.cpus[1:], start=1):
            self._start(f"worker{i}", [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={cpus}"])
        for i in range(1, len(self.cpus)):
            self._wait_for(lambda: "Ray runtime started" in self.log(f"worker{i}"), timeout, f"worker node {i}")
        return self

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if any(p.poll() is not None for p in self.processes) or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.root.glob("*.log"))
                raise RuntimeError(f"{what} did not start:\n{logs}")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        for p in reversed(self.processes):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.processes):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            try:  # anything of that node still alive in its session
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "RayNodes":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def array_checksums(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """SHA-256 of every array of the image's pyramid (not its labels), to prove a run left them untouched."""
    from cellsam_ray.io.ngff import open_image

    image = open_image(url, storage_options)
    return {level.path: hashlib.sha256(image.array(i)[:].tobytes()).hexdigest()
            for i, level in enumerate(image.levels)}


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


def reference_dir() -> Path:
    """The shared reference material: ``$CELLSAM_REFERENCE_DIR``, else ``../shared/reference`` beside the
    repository checkout (where the project keeps it). Missing data is an error, not a reason to skip: the
    golden tests are what proves the model reproduces the published one."""
    configured = os.environ.get("CELLSAM_REFERENCE_DIR")
    folder = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "reference"
    if not (folder / "golden" / "cases.json").is_file():
        raise FileNotFoundError(f"no reference data at {folder} (expected golden/cases.json there); "
                                "set CELLSAM_REFERENCE_DIR to the folder holding golden/")
    return folder


def label_agreement(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """The golden label tolerance: (fraction of pixels equal once each actual id is mapped to its
    best-overlapping expected id, worst IoU of an expected cell with its best-matching actual cell)."""
    n_act, n_exp = int(actual.max()) + 1, int(expected.max()) + 1
    overlap = np.bincount(actual.ravel() * n_exp + expected.ravel(), minlength=n_act * n_exp).reshape(n_act, n_exp)
    mapping = overlap.argmax(axis=1)
    mapping[0] = 0
    agree = float(np.mean(mapping[actual] == expected))
    iou = overlap / (overlap.sum(axis=1)[:, None] + overlap.sum(axis=0)[None, :] - overlap)
    return agree, float(iou[1:, 1:].max(axis=0).min()) if n_exp > 1 else 1.0
