"""Per-tile results under a work prefix, so a crashed run resumes instead of starting over.

Each result is written as a data object first and a tiny ``.done`` marker last, both under keys derived
from the tile alone, so a retried or resumed task overwrites with the same bytes and a half-written
result is never mistaken for a finished one. Two copies of one tile may be written at once (a batch and
its backup) and one writer may be killed mid-write, so a result replaces its object whole: object stores
do that by themselves, a file system by writing a temporary file and renaming it.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


class WorkStore:
    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self._fs = None

    def __getstate__(self) -> dict:
        # Filesystem objects hold sockets; each process opens its own.
        return {"url": self.url, "storage_options": self.storage_options, "_fs": None}

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return self._fs

    @property
    def root(self) -> str:
        """The prefix as a path of ``fs``."""
        return fsspec.core.url_to_fs(self.url, **self.storage_options)[1]

    def _path(self, stage: str, key: str) -> str:
        return posixpath.join(self.root, stage, key)

    def write_file(self, name: str, data: bytes) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(posixpath.join(self.root, name), data)

    def read_file(self, name: str) -> bytes | None:
        path = posixpath.join(self.root, name)
        return self.fs.cat_file(path) if self.fs.exists(path) else None

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
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
