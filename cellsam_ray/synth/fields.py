"""Random fields that are pure functions of global pixel (or lattice) coordinates.

A synthetic slide is generated chunk by chunk, and must not depend on how it is chunked: the same pixel
gets the same value whether it is computed inside a 256² or a 512² chunk. So nothing here draws from a
stream of random numbers whose position depends on the region; every value is a hash of the seed, a
stream name and the integer coordinates (splitmix64, in numpy's wrapping uint64 arithmetic). Smooth fields
interpolate hashed lattice values with elementwise arithmetic only (no BLAS, no transcendental functions
whose SIMD paths could differ with array length), so they are bit-identical across chunkings.

Gaussian noise is the one exception: it comes from ``numpy.random`` per fixed 256² noise tile, seeded by
the tile's position, and regions are cut from those tiles.
"""

from __future__ import annotations

import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
NOISE_TILE = 256


def stream_key(seed: int, name: str) -> int:
    """A 64-bit key for one independent stream of values (e.g. "site-jitter") of one seed."""
    mixed = _mix(np.array([(seed * 0x2545F4914F6CDD1D + zlib.crc32(name.encode())) % 2**64], np.uint64))
    return int(mixed[0])


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 whose outputs look independent."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_uniform(key: int, *coords: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 values, one per element of the broadcast integer ``coords``."""
    h = np.full(np.broadcast_shapes(*(np.shape(c) for c in coords)), key, dtype=np.uint64)
    for c in coords:
        h = _mix(h ^ (np.asarray(c).astype(np.int64).astype(np.uint64) + _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def value_noise(key: int, ys: np.ndarray, xs: np.ndarray, wavelength: float) -> np.ndarray:
    """Smooth noise in [0, 1] on the grid ``ys`` × ``xs`` (1-d coordinate arrays), features ~``wavelength``.

    Uniform values on a square lattice of spacing ``wavelength``, blended with smoothstep weights, so the
    field is continuous with a continuous gradient.
    """
    gy, gx = np.asarray(ys, np.float64) / wavelength, np.asarray(xs, np.float64) / wavelength
    iy, ix = np.floor(gy), np.floor(gx)
    ty, tx = _smoothstep(gy - iy)[:, None], _smoothstep(gx - ix)
    y0, x0 = int(iy.min()), int(ix.min())
    nodes = hash_uniform(key, np.arange(y0, int(iy.max()) + 2)[:, None], np.arange(x0, int(ix.max()) + 2)[None, :])
    rx = (ix - x0).astype(np.intp)
    # Along x first, for every lattice row (few), then along y: the same operations, in the same order, as
    # value_noise_at, so both give identical values.
    rows = nodes[:, rx] * (1 - tx) + nodes[:, rx + 1] * tx
    ry = (iy - y0).astype(np.intp)
    return rows[ry] * (1 - ty) + rows[ry + 1] * ty


def value_noise_at(key: int, y: np.ndarray, x: np.ndarray, wavelength: float) -> np.ndarray:
    """``value_noise`` at scattered points (same-shape arrays ``y``, ``x``), e.g. at cell centres."""
    gy, gx = np.asarray(y, np.float64) / wavelength, np.asarray(x, np.float64) / wavelength
    iy, ix = np.floor(gy), np.floor(gx)
    ty, tx = _smoothstep(gy - iy), _smoothstep(gx - ix)
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    top = hash_uniform(key, iy, ix) * (1 - tx) + hash_uniform(key, iy, ix + 1) * tx
    bottom = hash_uniform(key, iy + 1, ix) * (1 - tx) + hash_uniform(key, iy + 1, ix + 1) * tx
    return top * (1 - ty) + bottom * ty


def fractal_noise(key: int, ys: np.ndarray, xs: np.ndarray, wavelength: float, octaves: int = 3) -> np.ndarray:
    """Value noise summed over octaves (each half the wavelength and weight), rescaled to [0, 1]."""
    total, weight = np.zeros((len(ys), len(xs))), 0.0
    for o in range(octaves):
        w = 0.5**o
        total += w * value_noise(_octave_key(key, o), ys, xs, wavelength / 2**o)
        weight += w
    return total / weight


def fractal_noise_at(key: int, y: np.ndarray, x: np.ndarray, wavelength: float, octaves: int = 3) -> np.ndarray:
    """``fractal_noise`` at scattered points: the same values as on the grid."""
    total, weight = np.zeros(np.shape(y)), 0.0
    for o in range(octaves):
        w = 0.5**o
        total += w * value_noise_at(_octave_key(key, o), y, x, wavelength / 2**o)
        weight += w
    return total / weight


def gaussian_noise(key: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Standard normal float32 noise for pixels [y0, y1) × [x0, x1) (non-negative coordinates).

    Drawn per fixed ``NOISE_TILE``² tile from a generator seeded by (key, tile row, tile column), so any
    region gets the same values whatever chunk it is computed in.
    """
    out = np.empty((y1 - y0, x1 - x0), np.float32)
    for ty in range(y0 // NOISE_TILE, (y1 - 1) // NOISE_TILE + 1):
        for tx in range(x0 // NOISE_TILE, (x1 - 1) // NOISE_TILE + 1):
            tile = np.random.default_rng([key, ty, tx]).standard_normal((NOISE_TILE, NOISE_TILE), np.float32)
            ty0, tx0 = ty * NOISE_TILE, tx * NOISE_TILE
            ya, yb = max(y0, ty0), min(y1, ty0 + NOISE_TILE)
            xa, xb = max(x0, tx0), min(x1, tx0 + NOISE_TILE)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = tile[ya - ty0 : yb - ty0, xa - tx0 : xb - tx0]
    return out


def _octave_key(key: int, octave: int) -> int:
    return (key + octave * 0x9E3779B97F4A7C15) % 2**64


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3 - 2 * t)
