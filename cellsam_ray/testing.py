"""Real parts for tests and demos: a local S3 server, a local Ray cluster, the OME-Zarr validator, and the
shared reference data (golden checkpoint, inputs and the published code's outputs).

No mocks: the S3 server is moto's real HTTP server on 127.0.0.1, the cluster is a real Ray node, and
validation is ome-zarr-models, the reference validator. moto and ome-zarr-models come with the ``test``
extra, so they are imported only when used.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cellsam_ray.evaluate import label_agreement  # noqa: F401 - the golden tolerance, re-exported for tests
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


def spec_storage(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Spec fields that reach the storage ``storage_options`` reach, as a user must write them: the plain
    options inline, the credentials named as environment variables (``safe_aws_environment`` sets them,
    and every process of the run reads them from its own environment)."""
    if not storage_options:
        return {}
    plain = {k: v for k, v in storage_options.items() if k not in TEST_CREDENTIALS}
    return {"storage_options": plain or None,
            "storage_options_env": {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY"}}


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


class _StartStop:
    """A cluster used as a context manager: started on entry (stopped again if starting fails), stopped on exit."""

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _end_sessions(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process (each leads a session of its own), SIGKILL any still running 30 s later, then
    whatever else of its session is alive."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        _kill_session(p.pid)


class RayNodes(_StartStop):
    """A real multi-node Ray cluster on this machine, every process listening on 127.0.0.1 only.

    The head is ``ray start --head``. Ray binds its servers to loopback only when a node's address is
    literally 127.0.0.1, which ``ray start`` gives only in its single-node mode
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``); in that mode ``ray start --address`` refuses to add a node,
    and with the mode off it rewrites 127.0.0.1 (and the head's address) to the machine's routable one.
    So each worker node is started by :func:`join_cluster` below: exactly what ``ray start --address
    --block`` runs once its checks pass (Ray's own ``Node`` with ``head=False``), with the head's and its
    own address kept at 127.0.0.1. Each node is its own process session, so stopping it (SIGTERM, then
    SIGKILL of its process group) takes down exactly its raylet, GCS and dashboard, never another cluster on
    the machine (``ray stop`` would stop them all). Each node has its own short temp dir (Unix socket paths
    are limited to 107 bytes), so ``/tmp/ray/ray_current_cluster`` is never written for others to join.
    """

    def __init__(self, cpus: tuple[int, ...] = (1, 1), env: dict[str, str] | None = None,
                 gpus: tuple[int, ...] | None = None) -> None:
        self.cpus = cpus
        self.gpus = gpus or (0,) * len(cpus)  # GPUs each node declares (Ray pins actors to them; none exist)
        self.env = {**os.environ, **safe_ray_environment(), **(env or {})}
        self.root = Path(tempfile.mkdtemp(prefix="crn", dir="/tmp"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.processes: dict[str, subprocess.Popen] = {}  # node name -> its process

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start(self, timeout: float = 120) -> "RayNodes":
        self._start("head", ["ray", "start", "--block", "--disable-usage-stats", f"--temp-dir={self.root / 'head'}",
                             "--head", f"--port={self.gcs_port}", f"--num-cpus={self.cpus[0]}",
                             f"--num-gpus={self.gpus[0]}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                             f"--dashboard-agent-listen-port={free_port()}"])
        self._wait_for("head", timeout)
        for cpus, gpus in zip(self.cpus[1:], self.gpus[1:]):
            self.add_worker(cpus, timeout, gpus=gpus)
        return self

    def add_worker(self, cpus: int, timeout: float = 120, gpus: int = 0) -> str:
        """Start one more worker node with ``cpus`` CPUs (and ``gpus`` declared GPUs); returns its name
        (``worker<i>``)."""
        name = f"worker{len(self.processes)}"
        self._start(name, [sys.executable, "-m", "cellsam_ray.testing", f"127.0.0.1:{self.gcs_port}", str(cpus),
                           str(self.root / name), str(free_port()), str(gpus)])
        self._wait_for(name, timeout)
        return name

    def running_workers(self) -> list[str]:
        return [name for name, p in self.processes.items() if name != "head" and p.poll() is None]

    def node_of(self, pid: int) -> str:
        """The name of the node whose processes include ``pid`` (every node is its own process session)."""
        session = _session_of(Path(f"/proc/{pid}"))
        return next(name for name, p in self.processes.items() if p.pid == session)

    def kill(self, name: str) -> None:
        """SIGKILL every process of one node at once, as when its machine is lost: the whole session, since
        Ray starts each worker process (a model actor) in a process group of its own."""
        _kill_session(self.processes[name].pid)
        self.processes[name].wait()

    def listening_addresses(self) -> set[str]:
        """The local IPs on which any process of the cluster's nodes accepts TCP connections (from /proc)."""
        sessions = {p.pid for p in self.processes.values()}
        inodes: set[str] = set()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if _session_of(proc) in sessions:
                    inodes.update(link.readlink().name[8:-1] for link in (proc / "fd").iterdir()
                                  if link.readlink().name.startswith("socket:["))
            except (OSError, IndexError, ValueError):  # a process that ended while being read
                continue
        return {_proc_net_ip(fields[1].split(":")[0])
                for table in ("/proc/net/tcp", "/proc/net/tcp6")
                for fields in (line.split() for line in Path(table).read_text().splitlines()[1:])
                if fields[3] == "0A" and fields[9] in inodes}  # 0A: LISTEN

    def _wait_for(self, name: str, timeout: float) -> None:
        """Until the node's log says it runs; its exit or the timeout raise with every node's log."""
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log(name):
            if self.processes[name].poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.root.glob("*.log"))
                raise RuntimeError(f"Ray node {name} did not start:\n{logs}")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        _end_sessions(list(reversed(self.processes.values())))
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)


class AutoscalingNodes(_StartStop):
    """A Ray cluster whose worker nodes its autoscaler launches on demand and removes when idle, on this machine.

    Ray's own fake multi-node provider (``provider.type: fake_multinode``, as Ray's
    ``test_autoscaler_fake_multinode.py`` uses it through ``AutoscalingCluster``, which this does not use: it
    runs ``ray stop --force``, ending every cluster on the machine). The head is ``ray start --head
    --autoscaling-config`` with ``RAY_FAKE_CLUSTER=1``; its autoscaler (the v1 monitor, updating every second)
    starts each node it launches as local processes, declaring the node type's resources, GPUs included,
    which do not exist. The config is written here (the Ray wheel lacks the provider's example), with the
    provider's ``gcs_address`` at this head's port rather than 6379. Every process of the cluster, the
    launched nodes' too, is in the head's process session, so stopping it ends exactly this cluster.
    """

    def __init__(self, head_cpus: int, node_types: dict[str, dict], idle_timeout_s: float = 6,
                 env: dict[str, str] | None = None) -> None:
        self.head_cpus, self.node_types, self.idle_timeout_s = head_cpus, node_types, idle_timeout_s
        self.env = {**os.environ, **safe_ray_environment(), "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
                    "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {})}
        self.root = Path(tempfile.mkdtemp(prefix="cas", dir="/tmp"))
        self.port = free_port()
        self.head: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The cluster config: the head (no worker of its own type) and ``node_types``."""
        types = {"ray.head.default": {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0},
                 **{name: {"node_config": {}, **kind} for name, kind in self.node_types.items()}}
        return {"cluster_name": "fake", "max_workers": sum(k.get("max_workers", 0) for k in self.node_types.values()),
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                             "disable_launch_config_check": True, "gcs_address": self.address},
                "available_node_types": types, "head_node_type": "ray.head.default",
                "idle_timeout_minutes": self.idle_timeout_s / 60, "upscaling_speed": 1.0, "auth": {}, "docker": {},
                **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                       "worker_setup_commands", "head_start_ray_commands",
                                       "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                                       "rsync_filter")},
                "file_mounts": {}, "file_mounts_sync_continuously": False}

    def start(self, timeout: float = 120) -> "AutoscalingNodes":
        config = self.root / "cluster.json"
        config.write_text(json.dumps(self.config()))
        log = open(self.root / "head.log", "w")
        self.head = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--disable-usage-stats", f"--port={self.port}",
             f"--num-cpus={self.head_cpus}", f"--autoscaling-config={config}", f"--temp-dir={self.root / 'ray'}",
             "--include-dashboard=false", f"--ray-client-server-port={free_port()}"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in (self.root / "head.log").read_text():
            if self.head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the autoscaling head did not start:\n{(self.root / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def worker_nodes(self) -> dict[str, int]:
        """The Ray node id of every worker node the autoscaler has running, with its raylet's pid."""
        found = {}
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if self.head is None or _session_of(proc) != self.head.pid:
                    continue
                args = (proc / "cmdline").read_bytes().split(b"\0")
                if not args[0].endswith(b"/raylet") or _parent_of(proc) == self.head.pid:  # the head's own raylet
                    continue
                node = next(a for a in args if a.startswith(b"--node_id=")).split(b"=", 1)[1].decode()
                found[node] = int(proc.name)
            except (OSError, IndexError, ValueError, StopIteration):  # ended meanwhile
                continue
        return found

    def kill_node(self, node_id: str) -> None:
        """SIGKILL one launched node, as when its machine is lost: its raylet, the processes it started (the
        model actors) and those naming it (its agents)."""
        raylet = self.worker_nodes()[node_id]
        doomed = []  # all found before any is killed: a killed raylet's children are handed to another parent
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if _session_of(proc) != self.head.pid:
                    continue
                if int(proc.name) == raylet or _parent_of(proc) == raylet or node_id.encode() in (
                        proc / "cmdline").read_bytes():
                    doomed.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue

    def wait_for_workers(self, count: int, timeout: float = 120) -> dict[str, int]:
        """Until exactly ``count`` worker nodes run (the autoscaler launched or removed them)."""
        deadline = time.monotonic() + timeout
        while len(nodes := self.worker_nodes()) != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(nodes)} worker node(s) after {timeout:g} s, not {count}")
            time.sleep(0.5)
        return nodes

    def stop(self) -> None:
        if self.head is not None:
            _end_sessions([self.head])  # the launched nodes are in the head's session
        shutil.rmtree(self.root, ignore_errors=True)


def array_checksums(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """SHA-256 of every array of the image's pyramid (not its labels), to prove a run left them untouched."""
    from cellsam_ray.io.ngff import open_image

    image = open_image(url, storage_options)
    return {level.path: hashlib.sha256(image.array(i)[:].tobytes()).hexdigest()
            for i, level in enumerate(image.levels)}


def file_checksums(folder: str | Path, skip: str | None = None) -> dict[str, str]:
    """SHA-256 of every file below a local ``folder`` (except below the relative path ``skip``), by path: the
    stored bytes themselves, which ``array_checksums`` cannot read where a chunk is damaged."""
    root = Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not (skip and str(p.relative_to(root)).startswith(skip))}


def label_chunk_files(slide: str, name: str) -> dict[str, bytes]:
    """Every chunk file of every level of a local slide's labels/<name>, by path below it (metadata left
    out): two runs' labels compared byte for byte."""
    root = Path(slide, "labels", name)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("s*/**/*"))
            if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs")}


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


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same cells, each possibly under another id."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def _session_of(proc: Path) -> int:
    """The session id of the process whose /proc folder is ``proc`` (field 6 of its stat line)."""
    return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])


def _parent_of(proc: Path) -> int:
    """The parent pid of the process whose /proc folder is ``proc`` (field 4 of its stat line)."""
    return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])


def _kill_session(session: int) -> None:
    """SIGKILL every process of a session, whatever its process group."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if _session_of(proc) == session:
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue


def _proc_net_ip(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words of the address, each in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    return str(getattr(address, "ipv4_mapped", None) or address)


def join_cluster(gcs_address: str, num_cpus: int, temp_dir: str, agent_port: int, num_gpus: int = 0) -> None:
    """Run a worker node of the cluster at ``gcs_address`` on 127.0.0.1 until this process is stopped (see
    :class:`RayNodes` for why not ``ray start --address``)."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=num_gpus,
                       temp_dir=temp_dir, dashboard_agent_listen_port=agent_port)
    Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print("Ray runtime started.", flush=True)
    signal.pause()


if __name__ == "__main__":
    join_cluster(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
