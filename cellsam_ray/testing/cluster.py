"""Real local Ray clusters for tests: one node, several nodes joined on 127.0.0.1, or a head with Ray's fake
multi-node autoscaler launching GPU node types on demand. Each is started in its own session and temp
folder on free ports, and only its own processes are ended (never ``ray stop``, which ends every cluster
on the machine). ``python -m cellsam_ray.testing.cluster GCS CPUS TEMP PORT GPUS`` runs one worker node."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any



def safe_ray_environment() -> dict[str, str]:
    """Environment for a local Ray node that listens on loopback only and phones nowhere (stack.md 5.3)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


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
        self._start(name, [sys.executable, "-m", "cellsam_ray.testing.cluster", f"127.0.0.1:{self.gcs_port}", str(cpus),
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
