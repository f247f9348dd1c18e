"""The label lease on a local disk and on the real S3 server: one holder at a time, stale leases taken over
only when asked (or when the holder's process is certainly gone), a lost lease noticed before a write."""

from __future__ import annotations

import json
import subprocess
import sys

import fsspec
import pytest

from cellsam_ray.driver.lease import Holder, Lease
from cellsam_ray.errors import RunFailed, UserError
from cellsam_ray.io.storage import StorageAccess
from cellsam_ray.testing.s3 import spec_storage


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(lease URL, storage access) on a local disk or on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "labels" / "cells.lease.json"), StorageAccess()
    s3_prefix, storage_options = request.getfixturevalue("s3_prefix"), request.getfixturevalue("storage_options")
    fields = spec_storage(storage_options)
    return f"{s3_prefix}/labels/cells.lease.json", StorageAccess(fields["storage_options"],
                                                                   fields["storage_options_env"])


def written(url: str, storage: StorageAccess, holder: Holder) -> None:
    fs, path = fsspec.core.url_to_fs(url, **(storage.options() or {}))
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, holder.to_bytes())


def test_one_holder_at_a_time(where):
    url, storage = where
    first = Lease(url, storage, "run-one", timeout=60)
    first.take(take_over=False, label="labels/cells")
    second = Lease(url, storage, "run-two", timeout=60)
    with pytest.raises(UserError, match="is being written by run run-one on .* last heartbeat 0 s ago"):
        second.take(take_over=True, label="labels/cells")  # take_over does not apply to a live lease
    first.check()
    first.release()
    second.take(take_over=False, label="labels/cells")  # released: free again
    second.release()


def test_a_stale_lease_is_taken_over_only_when_asked(where):
    url, storage = where
    stale = Holder("old-run", "another-host", 1, None, heartbeat=0.0)
    written(url, storage, stale)
    lease = Lease(url, storage, "new-run", timeout=60)
    with pytest.raises(UserError, match="held by run old-run on another-host .*pass --take-over"):
        lease.take(take_over=False, label="labels/cells")
    lease.take(take_over=True, label="labels/cells")
    fs, path = fsspec.core.url_to_fs(url, **(storage.options() or {}))
    assert json.loads(fs.cat_file(path))["run_id"] == "new-run"
    lease.release()
    assert not fs.exists(path)


def test_a_lease_whose_process_is_gone_is_taken_without_asking(where):
    """The run was killed on this host (its driver's pid no longer runs): no need to wait for it to go stale."""
    url, storage = where
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Holder.here("killed-run")
    written(url, storage, Holder(dead.run_id, dead.host, int(finished.stdout), "0", heartbeat=dead.heartbeat))
    lease = Lease(url, storage, "next-run", timeout=600)
    lease.take(take_over=False, label="labels/cells")
    lease.release()


def test_a_run_whose_lease_was_taken_over_finds_out_before_it_writes(where):
    url, storage = where
    lease = Lease(url, storage, "slow-run", timeout=60)
    lease.take(take_over=False, label="labels/cells")
    written(url, storage, Holder("usurper", "elsewhere", 7, None, heartbeat=0.0))  # e.g. another --take-over
    with pytest.raises(RunFailed, match="lost its lease on the label \\(now held by run usurper on elsewhere"):
        lease.check()
    lease.release()  # not ours any more: left alone
    fs, path = fsspec.core.url_to_fs(url, **(storage.options() or {}))
    assert json.loads(fs.cat_file(path))["run_id"] == "usurper"
