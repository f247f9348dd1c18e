"""The per-tile work store: a result is replaced whole, even while another copy of it is being written."""

from __future__ import annotations

import threading

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
