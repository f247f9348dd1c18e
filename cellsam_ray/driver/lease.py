"""One writer per label: a lease object beside the label image, taken atomically before any write.

The lease (``labels/<name>.lease.json``) names the run that holds it (run id, host, process) and when it
last renewed it (a heartbeat, every ``timeout / 10`` seconds from a thread of the driver). A second run on
the same label is refused with the holder's id and age. Taking and renewing are atomic where the store
allows it: an exclusive create on a local disk, and S3's conditional PUT (``If-None-Match: *`` to take,
``If-Match: <etag>`` to renew or take over), so two runs can never both believe they hold it. Other
object stores get a check-then-write, which narrows the race but cannot close it.

A lease with no heartbeat for ``timeout`` seconds is stale: its run died without releasing it. It is taken
over only when the user says so (``--take-over``), since a stalled but living run would otherwise be
written over. One case is certain and needs no flag: a holder on this host whose process is gone.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cellsam_ray.errors import RunFailed, UserError
from cellsam_ray.io.storage import StorageAccess


def _process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot), to tell a live holder from a reused pid."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class Holder:
    """What a lease says about the run that holds it."""

    run_id: str
    host: str
    pid: int
    started: str | None
    heartbeat: float

    @classmethod
    def here(cls, run_id: str) -> "Holder":
        pid = os.getpid()
        return cls(run_id, socket.gethostname(), pid, _process_start(pid), time.time())

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Holder | None":
        try:
            fields = json.loads(data)
            return cls(str(fields["run_id"]), str(fields["host"]), int(fields["pid"]), fields.get("started"),
                       float(fields["heartbeat"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as a lease of unknown age (refused, never taken silently)

    def gone(self) -> bool:
        """Certainly dead: it ran on this host and its process no longer exists (or is another one now)."""
        return self.host == socket.gethostname() and _process_start(self.pid) != self.started

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"run {self.run_id} on {self.host} (pid {self.pid}), last heartbeat {age:.0f} s ago"


class Lease:
    """This run's lease on one label; ``take`` it, then ``start_heartbeat``; ``check`` before writing; ``release``."""

    def __init__(self, url: str, storage: StorageAccess, run_id: str, timeout: float) -> None:
        self.url, self.storage, self.run_id, self.timeout = url, storage, run_id, timeout
        self.fs, self.path = fsspec.core.url_to_fs(url, **(storage.options() or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.s3 = "s3" in ([self.fs.protocol] if isinstance(self.fs.protocol, str) else self.fs.protocol)
        self.etag: str | None = None
        self.lost: str | None = None  # why the lease is no longer ours, once it is not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------- taking it
    def take(self, *, take_over: bool, label: str) -> None:
        """Hold the lease, or raise a UserError naming the run that holds it and what to do."""
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        if self._create():
            return
        data, etag = self._read()
        holder = Holder.from_bytes(data) if data is not None else None
        if data is None:  # released between our create and our read: try once more
            if self._create():
                return
            raise UserError(f"{label} is being taken by another run at this moment: try again")
        if holder is None:
            raise UserError(f"{label} has a lease file that cannot be read ({self.url}): if no run is writing "
                            "this label, delete that file and run again")
        stale = holder.gone() or time.time() - holder.heartbeat > self.timeout
        if not stale:
            raise UserError(f"{label} is being written by {holder.describe()}: wait for it to finish (or stop it) "
                            "before running on this label again")
        if not (take_over or holder.gone()):
            raise UserError(f"{label} is held by {holder.describe()}, longer than lease_timeout_s "
                            f"({self.timeout:.0f} s): if that run is dead, pass --take-over to take the label over")
        if not self._replace(etag):
            raise UserError(f"{label} was taken over by another run at this moment: try again")

    def _create(self) -> bool:
        data = Holder.here(self.run_id).to_bytes()
        if self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.s3:
            try:
                self.etag = self.fs.pipe_file(self.path, data, mode="create")["ETag"]
            except FileExistsError:
                return False
            return True
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, data)
        return self._read()[0] == data

    def _read(self) -> tuple[bytes | None, str | None]:
        try:
            data = self.fs.cat_file(self.path)
            etag = self.fs.info(self.path).get("ETag") if self.s3 else None
        except FileNotFoundError:
            return None, None
        return data, etag

    def _replace(self, etag: str | None) -> bool:
        """Take a stale lease over: atomically where the store allows (a rename, a conditional PUT)."""
        if self.local:
            aside = f"{self.path}.{self.run_id}.stale"
            try:
                os.rename(self.path, aside)  # exactly one of several takers wins this
            except FileNotFoundError:
                return False
            os.unlink(aside)
            return self._create()
        if self.s3:
            try:
                self.etag = self.fs.pipe_file(self.path, Holder.here(self.run_id).to_bytes(), IfMatch=etag)["ETag"]
            except OSError:
                return False
            return True
        self.fs.rm_file(self.path)
        return self._create()

    # ----------------------------------------------------------------------------------- keeping it
    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="cellsam-ray-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(self.timeout / 10, 0.5)):
            try:
                self.renew()
            except Exception as err:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                if self.lost:
                    return
                print(f"cellsam-ray: could not renew the lease {self.url}: {type(err).__name__}: {err}", flush=True)

    def renew(self) -> None:
        """Write a fresh heartbeat, if the lease is still ours; else remember that it was lost."""
        data = Holder.here(self.run_id).to_bytes()
        if self.s3:
            try:
                self.etag = self.fs.pipe_file(self.path, data, IfMatch=self.etag)["ETag"]
            except OSError:  # the precondition failed (another run wrote it), or the request did
                current, etag = self._read()
                holder = Holder.from_bytes(current) if current is not None else None
                if holder is not None and holder.run_id == self.run_id:
                    self.etag = etag  # still ours (a storage hiccup): the next heartbeat retries
                    raise
                self._lose()
            return
        current = self._read()[0]
        holder = Holder.from_bytes(current) if current is not None else None
        if holder is None or holder.run_id != self.run_id:
            self._lose()
            return
        if self.local:
            partial = f"{self.path}.{self.run_id}.partial"
            with open(partial, "wb") as f:
                f.write(data)
            os.replace(partial, self.path)
        else:
            self.fs.pipe_file(self.path, data)

    def _lose(self) -> None:
        data = self._read()[0]
        holder = Holder.from_bytes(data) if data is not None else None
        self.lost = f"now held by {holder.describe()}" if holder else "the lease file is gone"

    def check(self) -> None:
        """Renew now; RunFailed if the lease is no longer ours (taken over, or its file removed): this run
        must not write the label any more."""
        if not self.lost:
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a storage hiccup is not a lost lease; the heartbeat retries
                pass
        if self.lost:
            raise RunFailed(f"this run lost its lease on the label ({self.lost}); it wrote nothing more")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        data = self._read()[0]
        holder = Holder.from_bytes(data) if data is not None else None
        if holder is not None and holder.run_id == self.run_id:
            self.fs.rm_file(self.path)
