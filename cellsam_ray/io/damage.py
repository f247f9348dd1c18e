"""Naming the stored chunk that cannot be decoded, when reading an image fails.

A slide damaged in storage (a truncated upload, a chunk overwritten by another file) fails a read with the
codec's own words (``Zstd decompression error: invalid input data``), which name neither the array nor the
chunk. After a read fails, the chunks it covered are tried one by one; the stored bytes of the one that
fails are fetched and decoded again alone, in memory, with the array's own metadata. Only a chunk whose
bytes were fetched and still cannot be decoded is called damaged, so a storage error that comes and goes
(a dropped connection, refused credentials) is never reported as damage.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

# The metadata documents an array needs to be opened alone: zarr v3's, and v2's.
_METADATA = ("zarr.json", ".zarray")


def damaged_chunk(array: zarr.Array, selection: tuple) -> str | None:
    """The path (``s0/c/1/0/0``, from the store's root) of a stored chunk under the orthogonal ``selection``
    whose bytes cannot be decoded; None if every chunk there decodes or could not be fetched."""
    stored = array.shards or array.chunks  # a sharded array stores (and can lose) whole shards
    for coords in itertools.product(*(_indices(s, n, size) for s, n, size in zip(selection, stored, array.shape))):
        region = tuple(slice(c * n, min((c + 1) * n, size)) for c, n, size in zip(coords, stored, array.shape))
        try:
            array[region]
        except Exception:  # noqa: BLE001 - whatever the codec raises; the check below decides
            key = array.metadata.encode_chunk_key(coords)
            if _undecodable(array, key, region):
                return f"{array.path}/{key}" if array.path else key
    return None


def _indices(selection, chunk: int, size: int) -> Iterator[int]:
    """The chunk indices along one axis that an orthogonal selection (an int, a slice, a list) touches."""
    if isinstance(selection, slice):
        start, stop, _ = selection.indices(size)
        return iter(range(start // chunk, (stop - 1) // chunk + 1) if stop > start else ())
    if isinstance(selection, int):
        return iter((selection // chunk,))
    return iter(sorted({int(i) // chunk for i in selection}))


def _undecodable(array: zarr.Array, key: str, region: tuple) -> bool:
    """Whether the chunk's stored bytes can be fetched but not decoded (read again from a copy in memory)."""
    prototype = default_buffer_prototype()
    try:
        data = sync((array.store_path / key).get(prototype=prototype))
        documents = {name: sync((array.store_path / name).get(prototype=prototype)) for name in _METADATA}
    except Exception:  # noqa: BLE001 - not fetched: a storage problem, not damage
        return False
    if data is None:
        return False
    alone = MemoryStore()
    for name, document in (*documents.items(), (key, data)):
        if document is not None:
            sync(alone.set(name, document))
    try:
        zarr.open_array(alone, mode="r")[region]
    except Exception:  # noqa: BLE001 - the bytes themselves do not decode
        return True
    return False
