"""The record the merge stages pass around: a set of cell candidates with their masks, in level pixels.

Struct-of-arrays, so a tile's few hundred or thousand candidates cost a handful of numpy arrays, and it
serialises to one ``.npz`` (masks bit-packed, not compressed) for the work prefix that makes runs resumable.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

# Columns of ``CellSet.meta`` (float64). Integer-valued columns are exact in float64.
META_COLUMNS = (
    "y0", "x0",          # top-left of the mask, level pixels
    "cy", "cx",          # centre of the box, level pixels
    "score", "iou",      # detector score, predicted mask IoU (0 if the segmenter gives none)
    "producer_row", "producer_col", "local_index",
    "home_row", "home_col",
    "centrality",        # distance from the centre to the producer's window edge
    "touches_window_edge",  # 1 if the mask was cut by the producer's window (not the image) edge
    "oversized",            # 1 if the box is larger than 2×halo: the seam guarantee does not hold
    "id",                   # global label id once assigned, else 0
)
_COL = {name: i for i, name in enumerate(META_COLUMNS)}


class PackedMasks:
    """Masks held as flat boolean buffers (one per decoded file), a view made on access.

    A decoded tile of ~1,500 cells would otherwise build ~1,500 array objects, and every reconcile and
    paint task decodes several tiles' worth; picking or joining sets here is index arithmetic, no copies.
    """

    def __init__(self, buffers: list[np.ndarray], source: np.ndarray, starts: np.ndarray, shapes: np.ndarray):
        self.buffers, self.source, self.starts, self.shapes = buffers, source, starts, shapes
        self._lists = None

    @classmethod
    def of_buffer(cls, flat: np.ndarray, shapes: np.ndarray) -> "PackedMasks":
        sizes = shapes[:, 0] * shapes[:, 1]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else np.zeros(0, np.int64)
        return cls([flat], np.zeros(len(shapes), np.int64), starts, shapes)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._lists is None:  # Python ints: views are taken one by one in the paint and reconcile loops
            self._lists = (self.source.tolist(), self.starts.tolist(), self.shapes.tolist())
        source, starts, shapes = self._lists
        h, w = shapes[i]
        return self.buffers[source[i]][starts[i] : starts[i] + h * w].reshape(h, w)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, index: np.ndarray) -> "PackedMasks":
        return PackedMasks(self.buffers, self.source[index], self.starts[index], self.shapes[index])

    @staticmethod
    def concat(parts: list["PackedMasks"]) -> "PackedMasks":
        buffers, sources, first = [], [], 0
        for part in parts:
            buffers += part.buffers
            sources.append(part.source + first)
            first += len(part.buffers)
        return PackedMasks(buffers, np.concatenate(sources), np.concatenate([p.starts for p in parts]),
                           np.concatenate([p.shapes for p in parts]))

    def flat(self) -> np.ndarray:
        """Every mask raveled, in order, as one buffer."""
        if len(self.buffers) == 1 and len(self) and self.starts[0] == 0 and \
                np.array_equal(self.starts[1:], np.cumsum(self.shapes[:, 0] * self.shapes[:, 1])[:-1]) and \
                self.starts[-1] + self.shapes[-1, 0] * self.shapes[-1, 1] == self.buffers[0].size:
            return self.buffers[0]
        return np.concatenate([m.ravel() for m in self]) if len(self) else np.zeros(0, bool)


@dataclass
class CellSet:
    """Candidates (or kept cells) with their masks. ``meta`` rows follow ``META_COLUMNS``."""

    meta: np.ndarray = field(default_factory=lambda: np.zeros((0, len(META_COLUMNS))))
    masks: list[np.ndarray] | PackedMasks = field(default_factory=list)  # a list as built, packed as decoded

    def __len__(self) -> int:
        return len(self.masks)

    def shapes(self) -> np.ndarray:
        """(N, 2) int64 height and width of each mask."""
        return self._packed().shapes

    def _packed(self) -> PackedMasks:
        """The masks as ``PackedMasks`` (built once from a list: one copy of each mask)."""
        if not isinstance(self.masks, PackedMasks):
            shapes = np.array([m.shape for m in self.masks], dtype=np.int64).reshape(-1, 2)
            flat = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in self.masks]) if self.masks \
                else np.zeros(0, bool)
            self.masks = PackedMasks.of_buffer(flat, shapes)
        return self.masks

    def col(self, name: str) -> np.ndarray:
        return self.meta[:, _COL[name]]

    def set_col(self, name: str, values: np.ndarray) -> None:
        self.meta[:, _COL[name]] = values

    def subset(self, index: np.ndarray) -> "CellSet":
        index = np.asarray(index, dtype=np.int64)
        return CellSet(meta=self.meta[index].copy(), masks=self._packed().take(index))

    def bounds(self) -> np.ndarray:
        """(N, 4) int64 half-open mask extents y0, x0, y1, x1."""
        y0 = self.col("y0").astype(np.int64)
        x0 = self.col("x0").astype(np.int64)
        if not len(self):
            return np.zeros((0, 4), np.int64)
        hw = self.shapes()
        return np.stack([y0, x0, y0 + hw[:, 0], x0 + hw[:, 1]], axis=1)

    def rank_order(self) -> np.ndarray:
        """Indices from the lowest to the highest ranked cell (the order to paint in).

        The ranking decides seam conflicts and overlaps: a copy made by the cell's home tile first, then
        the copy seen with more context around it, then the model's predicted IoU, then its score, and
        finally a fixed tiebreak on the producing tile and its own order, so no run order can change it.
        """
        authoritative = (self.col("producer_row") == self.col("home_row")) & (
            self.col("producer_col") == self.col("home_col")
        )
        keys = (
            -self.col("local_index"),
            -self.col("producer_col"),
            -self.col("producer_row"),
            self.col("score"),
            self.col("iou"),
            self.col("centrality"),
            authoritative.astype(np.float64),
        )
        return np.lexsort(keys)

    @staticmethod
    def concat(sets: list["CellSet"]) -> "CellSet":
        sets = [s for s in sets if len(s)]
        if not sets:
            return CellSet()
        return CellSet(meta=np.concatenate([s.meta for s in sets]), masks=PackedMasks.concat([s._packed() for s in sets]))

    def __reduce__(self):
        # Ray (and any pickler) moves a CellSet as one bit-packed buffer: pickled as a list of thousands of
        # small arrays it cost 25 ms to put and 13 ms to get for 1,700 cells, against 1 ms and 3 ms.
        return (CellSet.from_bytes, (self.to_bytes(),))

    def to_bytes(self) -> bytes:
        packed = self._packed()
        buf = io.BytesIO()
        # Not compressed: the masks are bit-packed already, and zlib cost ten times the rest of the write
        # (and half the read, done once per neighbour by every reconcile task).
        flat = packed.flat()
        np.savez(buf, meta=self.meta, shapes=packed.shapes, bits=np.packbits(flat), nbits=len(flat))
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes) -> "CellSet":
        with np.load(io.BytesIO(data)) as f:
            meta, shapes, bits, nbits = f["meta"], f["shapes"], f["bits"], int(f["nbits"])
        flat = np.unpackbits(bits, count=nbits).view(bool)
        return CellSet(meta=meta, masks=PackedMasks.of_buffer(flat, shapes.astype(np.int64).reshape(-1, 2)))
