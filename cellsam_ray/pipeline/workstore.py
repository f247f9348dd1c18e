"""Per-tile results under a work prefix, so a crashed run resumes instead of starting over.

Each result is written as a data object first and a tiny ``.done`` marker last, both under keys derived
from the tile alone, so a retried or resumed task overwrites with the same bytes and a half-written
result is never mistaken for a finished one. Two copies of one tile may be written at once (a batch and
its backup) and one writer may be killed mid-write, so a result replaces its object whole: object stores
do that by themselves, a file system by writing a temporary file and renaming it.

The prefix is owned by one slide and label at a time: ``owner.json`` (run id, input, label, fingerprint)
is written before any result, and a finished run removes exactly the files of this layout, by name, never
the prefix recursively: a user's ``work_dir`` may hold other things, and those stay.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cellsam_ray.io.storage import StorageAccess

OWNER = "owner.json"
# Files a run writes at the top of its prefix: the owner marker, the report of a run that is not yet
# beside its label (see ``driver.lifecycle``), the marker that the label's arrays are this run's, and
# the fingerprint file of earlier versions.
TOP_FILES = (OWNER, "report.json", "label-created", "spec.json")
# A stage's files: <key>.npz, <key>.done, and the temporary <key>.<hex>.partial of a local write.
_STAGE_FILE = re.compile(r"^[A-Za-z0-9_]+(\.npz|\.done|\.[0-9a-f]{32}\.partial)$")


class WorkStore:
    def __init__(self, url: str, storage: StorageAccess | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage = storage or StorageAccess()
        self._fs = None

    def __getstate__(self) -> dict:
        # Filesystem objects hold sockets (and resolved credentials); each process opens its own.
        return {"url": self.url, "storage": self.storage, "_fs": None}

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, _ = fsspec.core.url_to_fs(self.url, **(self.storage.options() or {}))
        return self._fs

    @property
    def root(self) -> str:
        """The prefix as a path of ``fs``."""
        return fsspec.core.url_to_fs(self.url, **(self.storage.options() or {}))[1]

    def _path(self, stage: str, key: str) -> str:
        return posixpath.join(self.root, stage, key)

    def write_file(self, name: str, data: bytes) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(posixpath.join(self.root, name), data)

    def read_file(self, name: str) -> bytes | None:
        path = posixpath.join(self.root, name)
        return self.fs.cat_file(path) if self.fs.exists(path) else None

    def owner(self) -> dict | None:
        """The owner marker's fields, or None where there is none."""
        data = self.read_file(OWNER)
        if data is None:
            return None
        try:
            owner = json.loads(data)
        except ValueError:
            owner = None
        return owner if isinstance(owner, dict) else {}

    def has_results(self) -> bool:
        """Whether any stage holds results (of whichever run)."""
        try:
            entries = self.fs.ls(self.root, detail=True, refresh=True)
        except FileNotFoundError:
            return False
        return any(e["type"] == "directory" and self.done(posixpath.basename(e["name"].rstrip("/"))) for e in entries)

    def put(self, stage: str, key: str, data: bytes) -> None:
        path = self._path(stage, key)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            partial = f"{path}.{uuid.uuid4().hex}.partial"
            self.fs.pipe_file(partial, data)
            os.replace(partial, path + ".npz")  # atomic: a reader sees the old bytes or the new, never half
        else:
            self.fs.pipe_file(path + ".npz", data)
        self.fs.pipe_file(path + ".done", b"")

    def get(self, stage: str, key: str) -> bytes:
        return self.fs.cat_file(self._path(stage, key) + ".npz")

    def done(self, stage: str) -> set[str]:
        """Keys of the finished results of a stage."""
        root = self._path(stage, "")
        try:
            names = self.fs.ls(root, detail=False, refresh=True)
        except FileNotFoundError:
            return set()
        return {posixpath.basename(n)[: -len(".done")] for n in names if n.endswith(".done")}

    def remove(self) -> None:
        """Delete the files of this layout, by name (nothing else the prefix holds), then the folders
        that are left empty on a local disk."""
        try:
            top = self._entries(self.root)
        except FileNotFoundError:
            return
        ours, stages = [], []
        for path, name, is_folder in top:
            if is_folder:
                stages.append(path)
                ours += [p for p, n, folder in self._entries(path) if not folder and _STAGE_FILE.match(n)]
            elif name in TOP_FILES:
                ours.append(path)
        if not isinstance(self.fs, LocalFileSystem):
            if ours:
                self.fs.rm(ours)  # an object store deletes them in batches (S3: a thousand a request)
            return
        for path in ours:  # fsspec's rm would look each file up again
            os.remove(path)
        for folder in stages + [self.root]:
            try:
                os.rmdir(folder)
            except OSError:  # not empty: it holds something this run did not write
                pass

    def _entries(self, folder: str) -> list[tuple[str, str, bool]]:
        """(path, name, whether it is a folder) of what ``folder`` holds. On a local disk by ``os.scandir``:
        fsspec's listing looks every file up (about 0.3 s of the driver's CPU for a 4,096-tile slide's 8,192
        files)."""
        if isinstance(self.fs, LocalFileSystem):
            with os.scandir(folder) as listing:
                return [(e.path, e.name, e.is_dir(follow_symlinks=False)) for e in listing]
        return [(e["name"], posixpath.basename(e["name"].rstrip("/")), e["type"] == "directory")
                for e in self.fs.ls(folder, detail=True, refresh=True)]
