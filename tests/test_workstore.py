"""The per-tile work store: a result is replaced whole, even while another copy of it is being written."""

from __future__ import annotations

import posixpath
import threading

import pytest

from cellsam_ray.io.storage import StorageAccess
from cellsam_ray.pipeline.workstore import WorkStore


def test_concurrent_writers_of_one_key_never_expose_a_partial_result(tmp_path):
    store = WorkStore(str(tmp_path / "work"))
    payloads = [bytes([1]) * 3_000_000, bytes([2]) * 2_000_000]  # a batch and its backup, each whole
    store.put("candidates", "r00000_c00000", payloads[0])
    stop = threading.Event()

    def write(data: bytes) -> None:
        while not stop.is_set():
            store.put("candidates", "r00000_c00000", data)

    writers = [threading.Thread(target=write, args=(data,)) for data in payloads]
    for thread in writers:
        thread.start()
    try:
        reads = [store.get("candidates", "r00000_c00000") for _ in range(300)]
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    assert all(read in payloads for read in reads)
    assert store.done("candidates") == {"r00000_c00000"}
    assert [p.name for p in (tmp_path / "work" / "candidates").iterdir() if p.name.endswith(".partial")] == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_remove_deletes_this_layouts_files_and_nothing_a_user_put_beside_them(where, tmp_path, request):
    """A user's ``work_dir`` may hold other things: they stay, byte for byte; what the run wrote goes (and,
    on a local disk, the folders it leaves empty)."""
    if where == "s3":
        url, options = request.getfixturevalue("s3_prefix") + "/work", request.getfixturevalue("storage_options")
    else:
        url, options = str(tmp_path / "work"), {}
    store = WorkStore(url, StorageAccess(plain=options))
    for key in ("r00000_c00000", "r00000_c00001"):
        store.put("candidates", key, b"cells of " + key.encode())
    store.write_file("owner.json", b"{}")
    fs = store.fs
    theirs = {posixpath.join(store.root, "candidates", "my notes.txt"): b"mine",
              posixpath.join(store.root, "keep", "results.csv"): b"a,b\n1,2\n",
              posixpath.join(store.root, "README.txt"): b"what this folder is"}
    for path, data in theirs.items():
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)
    store.put("other_stage", "r00001_c00001", b"gone too")  # any stage folder of this layout

    store.remove()

    left = sorted(fs.find(store.root))
    assert left == sorted(theirs), left
    assert all(fs.cat_file(path) == data for path, data in theirs.items())
    if where == "local":
        assert not (tmp_path / "work" / "other_stage").exists()  # emptied, so removed
