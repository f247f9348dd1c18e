"""Opening zarr groups locally and on a real (moto) S3 server, and the errors a user gets."""

from __future__ import annotations

import numpy as np
import pytest
from zarr.storage import FsspecStore, LocalStore

from cellsam_ray.errors import UserError
from cellsam_ray.io.storage import check_location, join_url, open_group, open_store, parse_storage_options


def test_parse_storage_options():
    assert parse_storage_options(None) is None
    assert parse_storage_options("  ") is None
    assert parse_storage_options('{"anon": true, "endpoint_url": "http://x"}') == {"anon": True, "endpoint_url": "http://x"}
    with pytest.raises(UserError, match="not valid JSON"):
        parse_storage_options("{anon: true}")
    with pytest.raises(UserError, match="JSON object"):
        parse_storage_options("[1, 2]")


def test_join_url():
    assert join_url("s3://bucket/a.zarr/", "labels", "cells") == "s3://bucket/a.zarr/labels/cells"
    assert join_url("/data/a.zarr", "labels") == "/data/a.zarr/labels"
    assert join_url("file:///data/a.zarr", "s0") == "file:///data/a.zarr/s0"


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_local_roundtrip_and_read_only(tmp_path, zarr_format):
    url = str(tmp_path / "x.zarr")
    group = open_group(url, mode="w", zarr_format=zarr_format)
    group.create_array("a", shape=(4, 4), dtype="u2", chunks=(2, 2))[:] = np.arange(16).reshape(4, 4)
    assert isinstance(open_store(url), LocalStore)
    again = open_group(f"file://{url}", mode="r")
    assert again.metadata.zarr_format == zarr_format
    np.testing.assert_array_equal(again["a"][:], np.arange(16).reshape(4, 4))
    with pytest.raises(Exception):  # read-only: writing must fail, whatever zarr calls the error
        again["a"][0, 0] = 99
    assert open_group(url, mode="r")["a"][0, 0] == 0


def test_local_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_group(str(tmp_path / "missing.zarr"), mode="r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no zarr group"):
        open_group(str(tmp_path / "empty"), mode="r")
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(UserError, match="is a file"):
        open_group(str(tmp_path / "file.txt"), mode="r")
    with pytest.raises(UserError, match="only applies to remote"):
        open_store(str(tmp_path / "x.zarr"), {"anon": True})


def test_s3_roundtrip(s3_prefix, storage_options):
    group = open_group(s3_prefix, storage_options, mode="w", zarr_format=3)
    group.create_array("a", shape=(8,), dtype="i4", chunks=(4,))[:] = np.arange(8)
    assert isinstance(open_store(s3_prefix, storage_options), FsspecStore)
    np.testing.assert_array_equal(open_group(s3_prefix, storage_options)["a"][:], np.arange(8))


def test_memory_url():
    group = open_group("memory://storage-test/x.zarr", mode="w", zarr_format=3)
    group.attrs["hello"] = "world"
    assert open_group("memory://storage-test/x.zarr", mode="r").attrs["hello"] == "world"


def test_s3_errors(s3, storage_options):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' .* does not exist"):
        open_group("s3://no-such-bucket/x.zarr", storage_options, mode="w")
    with pytest.raises(UserError, match="bucket 'no-such-bucket'"):
        open_group("s3://no-such-bucket/x.zarr", storage_options, mode="r")
    with pytest.raises(UserError, match="does not exist"):
        open_group(s3.url("never-written.zarr"), storage_options, mode="r")
    # A 404 (moto's answer to a missing bucket) must not be mistaken for an empty bucket when writing.
    check_location(s3.url("fresh.zarr"), storage_options, must_exist=False)


def test_unreachable_endpoint_is_a_user_error():
    options = {"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(UserError, match="cannot reach"):
        open_group("s3://bucket/x.zarr", options, mode="r")
