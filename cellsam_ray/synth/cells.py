"""Where the cells are: a global lattice of candidate cell centres, thinned, and the pixels each one owns.

The model, all in level-0 pixels:

* One candidate centre per ``SPACING``² lattice cell, jittered inside it. Its lattice index (i, j) gives
  the cell's id, ``1 + i * columns + j``: unique across the slide and the same whatever the chunking.
* Each candidate lies in tissue or not (a smooth tissue field) and has a class (immune, stromal,
  epithelial) from a smooth tissue-type field, so classes come in regions, as in tissue.
* Candidates are thinned by a Matérn type-II hard core whose radius depends on the class: a candidate
  survives unless a candidate with a smaller random mark lies within its radius. Immune regions keep every
  candidate (small packed cells, ~13 px across); epithelial regions keep few (large cells, ~30 px).
  The rule only looks at neighbours, so any region can be computed on its own.
* A pixel belongs to the nearest surviving centre (a Voronoi diagram), if it lies within that cell's
  radius; otherwise it is extracellular space. Distances are measured after warping the pixel coordinates
  by smooth noise, which makes cell borders irregular while keeping cells connected.
* Each cell has an elliptical nucleus, offset from its centre, no farther than 45% of the distance to the
  nearest neighbour centre, so it lies inside the cell (and is clipped to it in the rare warped cases).

All values come from ``fields`` (hashes of coordinates), so a region's labels are bit-identical however
the slide is cut into chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellsam_ray.synth import fields

SPACING = 12  # px between candidate centres
MAX_RADIUS = 23.5  # px; a cell's pixels lie within this of its (warped) centre
SEARCH = 2  # lattice cells searched around a pixel: any centre within MAX_RADIUS is within 2 (23.5 < 2*12)
WARP = ((16.0, 2.4), (6.0, 0.8))  # (wavelength, amplitude) of the border-roughening warp, px
MAX_WARP = sum(a for _, a in WARP)

IMMUNE, STROMAL, EPITHELIAL = 0, 1, 2
CLASS_NAMES = ("immune", "stromal", "epithelial")
HARD_CORE = np.array([7.0, 11.0, 14.5])  # Matérn radius per class, px
CELL_RADIUS = np.array([8.5, 9.5, 21.0])  # typical cut radius per class, px

TISSUE_WAVELENGTH, TISSUE_THRESHOLD = 700.0, 0.43
TYPE_WAVELENGTH, IMMUNE_BELOW, EPITHELIAL_ABOVE = 420.0, 0.45, 0.54

_THIN_REACH = math.ceil(HARD_CORE.max() / SPACING)  # lattice cells a hard core can reach
_NN_REACH = 3  # lattice cells searched for the nearest neighbour (36 px)


@dataclass(frozen=True)
class Sites:
    """Cell centres and their attributes on a block of the lattice, rows i0.., columns j0.. (2-d arrays).

    ``y``/``x`` are +inf for lattice cells without a cell, so distances to them are infinite.
    """

    i0: int
    j0: int
    ids: np.ndarray
    alive: np.ndarray
    cls: np.ndarray
    y: np.ndarray
    x: np.ndarray
    radius: np.ndarray
    nucleus_y: np.ndarray
    nucleus_x: np.ndarray
    nucleus_a: np.ndarray
    nucleus_b: np.ndarray
    nucleus_cos: np.ndarray
    nucleus_sin: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.ids.shape


class CellLattice:
    """The cells of one slide (``shape`` in level-0 pixels) for one seed."""

    def __init__(self, shape: tuple[int, int], seed: int) -> None:
        self.shape = shape
        self.rows, self.columns = (math.ceil(n / SPACING) for n in shape)
        if self.rows * self.columns >= 2**32 - 1:
            raise ValueError(f"a {shape[0]}x{shape[1]} slide has too many cell sites for uint32 ids")
        self.seed = seed
        self._key = {name: fields.stream_key(seed, name) for name in (
            "jitter-y", "jitter-x", "mark", "tissue", "type", "type-jitter", "radius", "nucleus-size",
            "nucleus-shape", "nucleus-angle", "nucleus-offset", "nucleus-direction", "nucleus-side",
            *(f"warp-{axis}-{octave}" for axis in "yx" for octave in range(len(WARP))),
        )}

    # ----------------------------------------------------------------------------------------- fields
    def tissue(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The smooth tissue field at points; tissue where it exceeds ``TISSUE_THRESHOLD``."""
        return fields.fractal_noise_at(self._key["tissue"], y, x, TISSUE_WAVELENGTH)

    def tissue_grid(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """The tissue field on the pixel grid ``ys`` × ``xs``."""
        return fields.fractal_noise(self._key["tissue"], ys, xs, TISSUE_WAVELENGTH)

    def warp(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Warped coordinates (qy, qx) of the pixel grid ``ys`` × ``xs``: where distances are measured."""
        qy = np.repeat(np.asarray(ys, np.float64)[:, None], len(xs), axis=1)
        qx = np.repeat(np.asarray(xs, np.float64)[None, :], len(ys), axis=0)
        for octave, (wavelength, amplitude) in enumerate(WARP):
            qy += amplitude * (2 * fields.value_noise(self._key[f"warp-y-{octave}"], ys, xs, wavelength) - 1)
            qx += amplitude * (2 * fields.value_noise(self._key[f"warp-x-{octave}"], ys, xs, wavelength) - 1)
        return qy, qx

    # ------------------------------------------------------------------------------------------ sites
    def sites(self, i0: int, i1: int, j0: int, j1: int) -> Sites:
        """The cells of lattice rows [i0, i1) and columns [j0, j1) (may extend past the slide: empty there)."""
        m = _NN_REACH + _THIN_REACH  # candidates are needed this far around to decide survival and spacing
        i = np.arange(i0 - m, i1 + m)[:, None]
        j = np.arange(j0 - m, j1 + m)[None, :]
        inside = (i >= 0) & (i < self.rows) & (j >= 0) & (j < self.columns)
        k = self._key
        y = (i + 0.15 + 0.7 * fields.hash_uniform(k["jitter-y"], i, j)) * SPACING
        x = (j + 0.15 + 0.7 * fields.hash_uniform(k["jitter-x"], i, j)) * SPACING
        candidate = inside & (self.tissue(y, x) > TISSUE_THRESHOLD)
        kind = fields.fractal_noise_at(k["type"], y, x, TYPE_WAVELENGTH)
        kind = kind + 0.05 * (fields.hash_uniform(k["type-jitter"], i, j) - 0.5)
        cls = np.where(kind < IMMUNE_BELOW, IMMUNE, np.where(kind > EPITHELIAL_ABOVE, EPITHELIAL, STROMAL))
        mark = np.where(candidate, fields.hash_uniform(k["mark"], i, j), np.inf)

        # Matérn II: survive unless a candidate with a smaller mark lies within this candidate's hard core.
        core = HARD_CORE[cls]
        alive = candidate.copy()
        t = _THIN_REACH
        for di in range(-t, t + 1):
            for dj in range(-t, t + 1):
                if di or dj:
                    oy, ox, om = (_shifted(a, di, dj) for a in (y, x, mark))
                    near = (y - oy) ** 2 + (x - ox) ** 2 < core**2
                    alive &= ~(near & (om < mark))
        # Distance to the nearest surviving neighbour (capped: isolated cells are not made huge).
        ay, ax = np.where(alive, y, np.inf), np.where(alive, x, np.inf)
        nn2 = np.full(y.shape, (2 * MAX_RADIUS) ** 2)
        n = _NN_REACH
        for di in range(-n, n + 1):
            for dj in range(-n, n + 1):
                if di or dj:
                    nn2 = np.minimum(nn2, (y - _shifted(ay, di, dj)) ** 2 + (x - _shifted(ax, di, dj)) ** 2)
        nn = np.sqrt(nn2)

        crop = (slice(m, m + i1 - i0), slice(m, m + j1 - j0))
        i, j = np.broadcast_arrays(i, j)
        i, j, y, x, alive, cls, nn = (a[crop] for a in (i, j, y, x, alive, cls, nn))
        u = {name: fields.hash_uniform(k[name], i, j) for name in (
            "radius", "nucleus-size", "nucleus-shape", "nucleus-angle", "nucleus-offset", "nucleus-direction",
            "nucleus-side")}
        radius = np.clip(CELL_RADIUS[cls] * (0.85 + 0.3 * u["radius"]), 0.55 * nn, MAX_RADIUS)
        # Nucleus: semi-axes a >= b, centre offset so that offset + a <= 0.45 * nn (inside the Voronoi cell).
        a = np.minimum(0.36 * nn, 0.55 * radius) * (0.75 + 0.25 * u["nucleus-size"])
        b = a * (0.6 + 0.4 * u["nucleus-shape"])
        cos, sin = _unit_vector(u["nucleus-angle"])
        dcos, dsin = _unit_vector(u["nucleus-direction"])
        sign = np.where(u["nucleus-side"] < 0.5, 1.0, -1.0)  # _unit_vector covers half the circle
        offset = (0.45 * nn - a) * u["nucleus-offset"] * 0.7
        return Sites(
            i0=i0, j0=j0,
            ids=np.where(alive, 1 + i * self.columns + j, 0).astype(np.int64),
            alive=alive,
            cls=cls.astype(np.int8),
            y=np.where(alive, y, np.inf),
            x=np.where(alive, x, np.inf),
            radius=radius,
            nucleus_y=y + sign * offset * dcos,
            nucleus_x=x + sign * offset * dsin,
            nucleus_a=a, nucleus_b=b, nucleus_cos=cos, nucleus_sin=sin,
        )

    # ----------------------------------------------------------------------------------------- pixels
    def render(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, Sites]:
        """Cells on the pixel grid ``ys`` × ``xs`` (1-d integer coordinates, contiguous).

        Returns (labels int64, nucleus bool, owner, sites): ``owner`` is each pixel's index into the flat
        ``sites`` arrays (meaningful where labels > 0), for looking up per-cell attributes.
        """
        qy, qx = self.warp(ys, xs)
        ci, cj = np.floor(qy / SPACING).astype(np.int64), np.floor(qx / SPACING).astype(np.int64)
        i0, j0 = int(ci.min()) - SEARCH, int(cj.min()) - SEARCH
        sites = self.sites(i0, int(ci.max()) + SEARCH + 1, j0, int(cj.max()) + SEARCH + 1)
        columns = sites.shape[1]
        # float32 and in-place arithmetic: this loop is most of the cost of a synthetic slide.
        sy, sx = sites.y.astype(np.float32).ravel(), sites.x.astype(np.float32).ravel()
        py, px = qy.astype(np.float32), qx.astype(np.float32)
        base = ((ci - i0) * columns + (cj - j0)).astype(np.int32)
        best = np.full(qy.shape, np.inf, np.float32)
        owner = np.zeros(qy.shape, np.int32)
        index, d2, dx, closer = np.empty_like(base), np.empty_like(py), np.empty_like(py), np.empty(qy.shape, bool)
        for di in range(-SEARCH, SEARCH + 1):
            for dj in range(-SEARCH, SEARCH + 1):
                np.add(base, di * columns + dj, out=index)
                np.subtract(py, sy[index], out=d2)
                np.multiply(d2, d2, out=d2)
                np.subtract(px, sx[index], out=dx)
                np.multiply(dx, dx, out=dx)
                np.add(d2, dx, out=d2)
                np.less(d2, best, out=closer)
                np.copyto(best, d2, where=closer)
                np.copyto(owner, index, where=closer)
        radius = sites.radius.ravel()[owner]
        inside = best < radius**2
        labels = np.where(inside, sites.ids.ravel()[owner], 0)
        dy = qy - sites.nucleus_y.ravel()[owner]
        dx = qx - sites.nucleus_x.ravel()[owner]
        cos, sin = sites.nucleus_cos.ravel()[owner], sites.nucleus_sin.ravel()[owner]
        u = (dy * cos + dx * sin) / sites.nucleus_a.ravel()[owner]
        v = (dx * cos - dy * sin) / sites.nucleus_b.ravel()[owner]
        nucleus = inside & (u * u + v * v < 1)
        return labels, nucleus, owner, sites


def _shifted(a: np.ndarray, di: int, dj: int) -> np.ndarray:
    """``a`` moved so that out[i, j] = a[i + di, j + dj]; +inf where that falls outside."""
    out = np.full(a.shape, np.inf)
    h, w = a.shape
    out[max(0, -di) : h - max(0, di), max(0, -dj) : w - max(0, dj)] = a[
        max(0, di) : h - max(0, -di), max(0, dj) : w - max(0, -dj)
    ]
    return out


def _unit_vector(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A direction on the half circle from uniform ``u``, by the rational parametrisation (no trig: exact)."""
    t = 2 * u - 1
    return (1 - t * t) / (1 + t * t), 2 * t / (1 + t * t)
