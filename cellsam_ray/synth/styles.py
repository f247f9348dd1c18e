"""A family of named synthetic image styles with ground truth, each randomised from its seed.

``tissue`` is the original multiplexed tissue model (``tissue.TissueModel``). The others are drawn whole,
in memory, by one recipe with per-style ranges; every size, density, brightness, noise and artefact
level is drawn from the seed, so two seeds of a style look alike in kind and differ in degree:

=============  ===================================================================  ===================
style          what it draws                                                        channels (roles)
=============  ===================================================================  ===================
tissue         the original multiplexed tissue (immune, stromal, epithelial areas)  DAPI / E-cadherin
nuclei         nuclear-only fluorescence: round or elongated nuclei, touching        DAPI / none
               clusters, no membrane channel; the labels are the nuclei
epithelium     dense polygonal epithelium in tissue islands, no gaps, membrane       DAPI / E-cadherin
               rims, nuclei offset inside cells, a cytoplasm marker
stroma         sparse elongated stromal cells with gaps, cytoplasm marker            DAPI / Vimentin
lymphocytes    small round cells (7–12 px) packed in aggregates, membrane marker     DAPI / CD45
large          large cells (30–62 px drawn, up to ~90 px where they meet) with gaps  DAPI / Phalloidin
brightfield    H&E-like RGB: dark hematoxylin nuclei on pink eosin tissue on light   R, G, B (stain)
               glass; the labels are the nuclei
envelope       nuclear-envelope stain: bright nuclear rims, dim insides; labels are  Lamin-B1 / none
               the nuclei. Held out of the bundled model's training (few-shot test)
=============  ===================================================================  ===================

Every fluorescence style also draws: uneven illumination, a point spread of its own width with
out-of-focus regions, Poisson photon noise and Gaussian read noise, cells spanning a wide range of
brightness (dim next to bright), bright debris and saturated spots that are not cells. The image is
rendered from the final label image, so each cell in the ground truth is exactly the cell in the
pixels; debris and saturated spots are added to the pixels only (they are not cells, and not labelled).

Unlike ``tissue``, these styles are not chunk-invariant: a slide is drawn whole (``MAX_PIXELS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.segmentation import relabel_sequential

STYLES = ("tissue", "nuclei", "epithelium", "stroma", "lymphocytes", "large", "brightfield", "envelope")
TRAINING_STYLES = STYLES[:-1]
"""The styles the bundled model is trained on; ``envelope`` is kept for the few-shot test."""
MAX_PIXELS = 4096 * 4096
"""Styles other than ``tissue`` are drawn in memory: at most this many pixels."""
GAIN, FULL = 8.0, 40000.0  # counts per photon; counts at a cell's full signal, before noise


@dataclass(frozen=True)
class StyleImage:
    """One drawn image: pixels (C, H, W), its true cells and their nuclei, and how to segment it."""

    style: str
    image: np.ndarray  # (C, H, W) uint16 (fluorescence) or uint8 (brightfield RGB)
    channel_names: tuple[str, ...]
    labels: np.ndarray  # (H, W) uint32: the objects to find (cells; nuclei for nuclear styles)
    nuclei: np.ndarray  # (H, W) uint32: each object's nucleus, with the object's id (0 elsewhere)
    nuclear: tuple[str, ...]  # channel names of the nuclear role (empty for brightfield)
    whole_cell: tuple[str, ...]  # channel names of the whole-cell role (empty: nuclear only)
    stain: str = "fluorescence"  # or "brightfield"
    params: dict = field(default_factory=dict)  # the drawn parameters, for reports


def render_style(style: str, shape: tuple[int, int], seed: int) -> StyleImage:
    """Draw an image of ``style`` of ``shape`` (H, W) pixels from ``seed``."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    h, w = int(shape[0]), int(shape[1])
    if style == "tissue":
        from cellsam_ray.synth.tissue import TissueModel

        model = TissueModel((h, w), seed=seed, channels=3)
        region = model.render(0, h, 0, w)
        labels = region.labels
        return StyleImage(style, region.image, tuple(m.name for m in model.markers), labels,
                          np.where(region.nuclei, labels, 0).astype(np.uint32), ("DAPI",), ("E-cadherin",))
    if h * w > MAX_PIXELS:
        raise ValueError(f"style {style} is drawn in memory: at most {MAX_PIXELS} pixels, got {h}x{w}")
    rng = np.random.default_rng([seed, STYLES.index(style), 15])
    return _RECIPES[style](rng, (h, w))


# ------------------------------------------------------------------------------------------ geometry
@dataclass
class Cells:
    """Cell centres (N,), semi-axes a >= b and orientation; nuclei the same, offset inside."""

    y: np.ndarray
    x: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    nuc_dy: np.ndarray
    nuc_dx: np.ndarray
    nuc_a: np.ndarray
    nuc_b: np.ndarray
    nuc_angle: np.ndarray


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], wavelength: float) -> np.ndarray:
    """Smooth noise in [0, 1] with features of about ``wavelength`` pixels."""
    step = max(1.0, wavelength / 4)
    coarse = (int(np.ceil(shape[0] / step)) + 3, int(np.ceil(shape[1] / step)) + 3)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse), 1.2, mode="wrap")
    full = ndimage.zoom(noise, step, order=1)[: shape[0], : shape[1]]
    full = np.pad(full, ((0, shape[0] - full.shape[0]), (0, shape[1] - full.shape[1])), mode="edge")
    lo, hi = full.min(), full.max()
    return ((full - lo) / (hi - lo + 1e-12)).astype(np.float32)


def place(rng: np.random.Generator, shape: tuple[int, int], density: np.ndarray, count: int,
          min_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``count`` centres drawn with probability ∝ ``density`` (H, W), none closer than
    ``min_distance`` (Matérn hard core: of a close pair the later draw goes)."""
    flat = density.ravel().astype(np.float64)
    if flat.sum() <= 0 or count <= 0:
        return np.zeros(0), np.zeros(0)
    index = rng.choice(flat.size, size=int(count * 2.5), p=flat / flat.sum())
    y = index // shape[1] + rng.uniform(0, 1, index.size)
    x = index % shape[1] + rng.uniform(0, 1, index.size)
    keep = np.ones(index.size, bool)
    for i, j in sorted(cKDTree(np.c_[y, x]).query_pairs(min_distance)):
        if keep[i] and keep[j]:
            keep[j] = False
    y, x = y[keep][:count], x[keep][:count]
    return y, x


def paint(shape: tuple[int, int], cells: Cells, rng: np.random.Generator, roughness: float,
          polygonal: float) -> tuple[np.ndarray, np.ndarray]:
    """Label every pixel with the cell whose (rough) ellipse holds it most centrally.

    A pixel's score for a cell is its ellipse-normalised distance q (q < 1 inside), roughened by a
    smooth field; the lowest score wins, so overlapping ellipses meet on a shared border (polygons when
    ``polygonal`` stretches them into each other). Each cell keeps only its largest connected piece;
    nuclei are ellipses offset inside their cells, clipped to them. Returns labels and nuclei (uint32).
    """
    h, w = shape
    best = np.full(shape, np.inf, np.float32)
    owner = np.zeros(shape, np.int32)
    wobble = (smooth_field(rng, shape, 9.0) - 0.5) * 2 * roughness
    grow = 1.0 + polygonal
    boxes = []
    for k in range(len(cells.y)):
        reach = cells.a[k] * grow * (1 + roughness) + 2
        y0, y1 = max(0, int(cells.y[k] - reach)), min(h, int(cells.y[k] + reach) + 1)
        x0, x1 = max(0, int(cells.x[k] - reach)), min(w, int(cells.x[k] + reach) + 1)
        boxes.append((y0, y1, x0, x1))
        if y0 >= y1 or x0 >= x1:
            continue
        q = _ellipse(np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5, cells.y[k], cells.x[k], cells.a[k] * grow,
                     cells.b[k] * grow, cells.angle[k]) * (1 + wobble[y0:y1, x0:x1])
        window = best[y0:y1, x0:x1]
        closer = q < window
        window[closer] = q[closer]
        owner[y0:y1, x0:x1][closer] = k + 1
    labels = np.where(best < grow, owner, 0)
    labels = _largest_pieces(labels)
    nuclei = np.zeros(shape, np.int32)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        if y0 >= y1 or x0 >= x1:
            continue
        q = _ellipse(np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5, cells.y[k] + cells.nuc_dy[k],
                     cells.x[k] + cells.nuc_dx[k], cells.nuc_a[k], cells.nuc_b[k], cells.nuc_angle[k])
        mine = (labels[y0:y1, x0:x1] == k + 1) & (q < 1)
        nuclei[y0:y1, x0:x1][mine] = k + 1
    labels, forward, _ = relabel_sequential(labels)
    nuclei = forward[nuclei]
    return labels.astype(np.uint32), nuclei.astype(np.uint32)


def _ellipse(ys, xs, cy, cx, a, b, angle):
    dy, dx = ys[:, None] - cy, xs[None, :] - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (dy * c + dx * s) / a, (dx * c - dy * s) / b
    return np.sqrt(u * u + v * v).astype(np.float32)


def _largest_pieces(labels: np.ndarray) -> np.ndarray:
    """Each label reduced to its largest 4-connected piece (rough borders can cut off slivers)."""
    out = labels.copy()
    for index, found in enumerate(ndimage.find_objects(labels)):
        if found is None:
            continue
        mine = labels[found] == index + 1
        pieces, n = ndimage.label(mine)
        if n > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            out[found][mine & (pieces != 1 + int(np.argmax(sizes)))] = 0
    return out


def make_cells(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, diameter: tuple[float, float],
               elongation: tuple[float, float], nucleus: tuple[float, float], offset: float,
               align: np.ndarray | None = None) -> Cells:
    """Cells at (y, x) with diameters (sqrt of a·b·4) in ``diameter`` (log-uniform), aspect a/b in
    ``elongation``, nucleus diameter as a share of the cell's in ``nucleus``, nucleus centre moved by up
    to ``offset`` of the room it has; ``align`` gives orientations (else random)."""
    n = len(y)
    d = np.exp(rng.uniform(np.log(diameter[0]), np.log(diameter[1]), n))
    aspect = rng.uniform(*elongation, n)
    a, b = d / 2 * np.sqrt(aspect), d / 2 / np.sqrt(aspect)
    angle = align + rng.normal(0, 0.25, n) if align is not None else rng.uniform(0, np.pi, n)
    share = rng.uniform(*nucleus, n)
    na, nb = a * share, b * share * rng.uniform(0.8, 1.0, n)
    room = (b - nb) * offset * rng.uniform(0, 1, n)
    direction = rng.uniform(0, 2 * np.pi, n)
    return Cells(y, x, a, b, angle, room * np.sin(direction), room * np.cos(direction), np.maximum(na, 1.5),
                 np.maximum(nb, 1.2), angle + rng.normal(0, 0.3, n))


# ------------------------------------------------------------------------------------------ optics
def borders(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels of a cell within ``width`` px of another label (a cell's rim, on both sides of a border)."""
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width - 1)
    return edge & (labels > 0)


def per_cell(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A per-cell value (``values`` indexed by id - 1) painted on the cell's pixels, 0 elsewhere."""
    table = np.concatenate([[0.0], values]).astype(np.float32)
    return table[labels]


def brightness(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    """Per-cell brightness in [1/spread, 1], log-uniform: dim cells next to bright ones."""
    return np.exp(rng.uniform(-np.log(spread), 0, n)).astype(np.float32)


@dataclass(frozen=True)
class Optics:
    """How one fluorescence image is formed from its stain."""

    blur: float  # px, point spread sigma in focus
    defocus: float  # px, extra blur in out-of-focus regions
    illumination: float  # brightness drops by up to this share across the field
    photons: float  # photons at full signal (shot noise)
    read_noise: float  # counts
    offset: float  # counts
    debris: int  # bright non-cell blobs per megapixel
    saturated: int  # saturated spots per megapixel

    @staticmethod
    def draw(rng: np.random.Generator) -> Optics:
        return Optics(
            blur=float(rng.uniform(0.6, 2.0)),
            defocus=float(rng.choice([0.0, rng.uniform(1.0, 4.0)], p=[0.4, 0.6])),
            illumination=float(rng.uniform(0.0, 0.6)),
            photons=float(np.exp(rng.uniform(np.log(15), np.log(1000)))),
            read_noise=float(rng.uniform(2, 30)),
            offset=float(rng.uniform(50, 600)),
            debris=int(rng.integers(0, 15)),
            saturated=int(rng.integers(0, 25)),
        )


def form(rng: np.random.Generator, signals: list[np.ndarray], optics: Optics) -> np.ndarray:
    """Fluorescence signals (1 = a bright cell's full signal) -> (C, H, W) uint16 counts.

    Blur (plus out-of-focus regions), uneven illumination, debris and saturated spots, then photon and
    read noise.
    """
    shape = signals[0].shape
    mp = shape[0] * shape[1] / 1e6
    focus = smooth_field(rng, shape, 300.0) if optics.defocus else None
    light = 1 - optics.illumination * smooth_field(rng, shape, 700.0)
    spots = np.zeros(shape, np.float32)
    for kind, count, radius, level in (("debris", optics.debris, (1.5, 6.0), (0.5, 2.0)),
                                       ("saturated", optics.saturated, (0.7, 2.0), (4.0, 12.0))):
        for _ in range(rng.poisson(count * mp)):
            cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
            r, v = rng.uniform(*radius), rng.uniform(*level)
            y0, y1 = max(0, int(cy - 3 * r)), min(shape[0], int(cy + 3 * r) + 1)
            x0, x1 = max(0, int(cx - 3 * r)), min(shape[1], int(cx + 3 * r) + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            spots[y0:y1, x0:x1] += v * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    channels = rng.random(len(signals)) < 0.7  # debris shows in most channels, not all
    out = np.empty((len(signals),) + shape, np.uint16)
    for c, signal in enumerate(signals):
        s = signal + (spots if channels[c] or c == 0 else 0)
        sharp = ndimage.gaussian_filter(s.astype(np.float32), optics.blur)
        if focus is not None:
            soft = ndimage.gaussian_filter(s.astype(np.float32), np.hypot(optics.blur, optics.defocus))
            sharp = sharp * (1 - focus) + soft * focus
        photons = np.maximum(sharp * light, 0) * optics.photons
        counts = rng.poisson(photons).astype(np.float32) * (FULL / optics.photons)
        counts += optics.offset + rng.normal(0, optics.read_noise, shape).astype(np.float32)
        out[c] = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
    return out


def texture(rng: np.random.Generator, shape: tuple[int, int], wavelength: float, depth: float) -> np.ndarray:
    """A multiplicative texture 1 - depth·noise (chromatin, granular cytoplasm)."""
    return (1 - depth * smooth_field(rng, shape, wavelength)).astype(np.float32)


# ------------------------------------------------------------------------------------------ recipes
def _tissue_mask(rng: np.random.Generator, shape, cover: float, wavelength: float) -> np.ndarray:
    """Tissue islands: a smooth field thresholded to cover about ``cover`` of the image."""
    f = smooth_field(rng, shape, wavelength)
    return f > np.quantile(f, 1 - cover)


def _cells_in(rng, shape, mask_or_density, diameter, packing, elongation, nucleus, offset, align=None,
              cap=None):
    """Cells over a region at a spacing of ``packing`` × their typical diameter."""
    density = mask_or_density.astype(np.float64)
    typical = float(np.sqrt(diameter[0] * diameter[1]))
    spacing = typical * packing
    area = float(density.sum() / max(density.max(), 1e-12))
    count = int(area / (spacing * spacing * 0.87)) + 1
    if cap:
        count = min(count, cap)
    y, x = place(rng, shape, density, count, spacing)
    angles = None if align is None else align[np.clip(y.astype(int), 0, shape[0] - 1),
                                              np.clip(x.astype(int), 0, shape[1] - 1)]
    return make_cells(rng, y, x, diameter, elongation, nucleus, offset, angles)


def _nuclear_only(rng, shape, name: str, rims: bool) -> StyleImage:
    size = float(np.exp(rng.uniform(np.log(9), np.log(30))))
    diameter = (size * 0.8, size * 1.25)
    elongation = (1.0, float(rng.uniform(1.1, 2.2)))
    clusters = rng.uniform(0.2, 1.0)  # share of nuclei in touching clusters
    cover = rng.uniform(0.3, 0.9)
    density = _tissue_mask(rng, shape, cover, 500.0).astype(np.float64) * (1 - clusters)
    blobs = smooth_field(rng, shape, size * 6) ** 4
    density = density + clusters * blobs * (blobs > 0.15)
    cells = _cells_in(rng, shape, density, diameter, rng.uniform(0.72, 1.1), elongation, (0.99, 1.0), 0.0)
    labels, _ = paint(shape, cells, rng, roughness=float(rng.uniform(0.0, 0.12)), polygonal=0.0)
    n = int(labels.max())
    level = per_cell(labels, brightness(rng, n, float(rng.uniform(1.5, 10))))
    chromatin = texture(rng, shape, float(rng.uniform(2, 5)), float(rng.uniform(0.1, 0.6)))
    if rims:
        rim = borders(labels, int(rng.integers(1, 3)))
        signal = level * np.where(rim, 1.0, float(rng.uniform(0.08, 0.3))) * chromatin
    else:
        signal = level * (labels > 0) * chromatin
    optics = Optics.draw(rng)
    if rims:  # a rim a pixel or two wide survives only a sharp focus
        optics = replace(optics, blur=min(optics.blur, 1.0), defocus=0.0)
    image = form(rng, [signal + 0.02 * smooth_field(rng, shape, 200)], optics)
    return StyleImage(name, image, (("Lamin-B1",) if rims else ("DAPI",)), labels, labels.copy(),
                      (("Lamin-B1",) if rims else ("DAPI",)), (), params={"diameter": size, **optics.__dict__})


def _nuclei(rng, shape):
    return _nuclear_only(rng, shape, "nuclei", rims=False)


def _envelope(rng, shape):
    return _nuclear_only(rng, shape, "envelope", rims=True)


def _multiplex(rng, shape, style, cells, labels, nuclei, whole_name, compartment, rim_width=2,
               extra=()) -> StyleImage:
    """DAPI, the whole-cell marker (membrane or cytoplasm) and a second marker, formed with optics."""
    n = int(labels.max())
    cell = labels > 0
    spread = float(rng.uniform(1.5, 8))
    dapi = per_cell(labels, brightness(rng, n, spread)) * (nuclei > 0) * texture(
        rng, shape, float(rng.uniform(2, 4)), float(rng.uniform(0.1, 0.5)))
    rim = borders(labels, rim_width)
    whole_level = per_cell(labels, brightness(rng, n, spread))
    cyto = texture(rng, shape, float(rng.uniform(3, 8)), float(rng.uniform(0.1, 0.5)))
    membrane = whole_level * (rim + float(rng.uniform(0.03, 0.15)) * (cell & ~rim))
    cytoplasm = whole_level * cell * cyto * np.where(nuclei > 0, float(rng.uniform(0.1, 0.5)), 1.0)
    whole = membrane if compartment == "membrane" else cytoplasm
    other = cytoplasm if compartment == "membrane" else membrane
    positive = per_cell(labels, (rng.random(n) < rng.uniform(0.3, 0.9)).astype(np.float32))
    background = float(rng.uniform(0.0, 0.06)) * ndimage.binary_dilation(cell, iterations=6)
    optics = Optics.draw(rng)
    names = ("DAPI", whole_name, extra[0] if extra else "Marker-3")
    image = form(rng, [dapi + background, whole + background, other * positive + background], optics)
    return StyleImage(style, image, names, labels, nuclei, ("DAPI",), (whole_name,), params=optics.__dict__)


def _epithelium(rng, shape):
    size = float(np.exp(rng.uniform(np.log(14), np.log(40))))
    mask = _tissue_mask(rng, shape, rng.uniform(0.4, 0.8), float(rng.uniform(300, 900)))
    cells = _cells_in(rng, shape, mask, (size * 0.8, size * 1.25), rng.uniform(0.85, 1.0), (1.0, 1.5),
                      (0.35, 0.6), 0.8)
    labels, nuclei = paint(shape, cells, rng, roughness=float(rng.uniform(0.02, 0.12)),
                           polygonal=float(rng.uniform(0.3, 0.6)))
    labels, nuclei = _tidy(np.where(mask, labels, 0), nuclei)  # islands have straight-cut edges
    return _multiplex(rng, shape, "epithelium", cells, labels, nuclei, "E-cadherin", "membrane",
                      rim_width=int(rng.integers(1, 4)), extra=("Pan-Cytokeratin",))


def _stroma(rng, shape):
    size = float(np.exp(rng.uniform(np.log(14), np.log(35))))
    mask = _tissue_mask(rng, shape, rng.uniform(0.5, 0.9), 600.0)
    flow = smooth_field(rng, shape, 400.0) * np.pi * 2
    cells = _cells_in(rng, shape, mask, (size * 0.8, size * 1.25), rng.uniform(1.1, 1.8), (1.8, 4.0),
                      (0.45, 0.7), 0.3, align=flow)
    labels, nuclei = paint(shape, cells, rng, roughness=float(rng.uniform(0.02, 0.15)), polygonal=0.0)
    return _multiplex(rng, shape, "stroma", cells, labels, nuclei, "Vimentin", "cytoplasm", extra=("CD31",))


def _lymphocytes(rng, shape):
    size = float(rng.uniform(7, 12))
    density = smooth_field(rng, shape, float(rng.uniform(150, 400))) ** 3
    density = np.where(density > 0.15, density, 0.02 * _tissue_mask(rng, shape, 0.5, 500.0))
    cap = int(shape[0] * shape[1] / (256 * 256) * 450)  # at most ~450 cells in a 256² window, on average
    cells = _cells_in(rng, shape, density, (size * 0.85, size * 1.2), rng.uniform(0.9, 1.05), (1.0, 1.3),
                      (0.6, 0.8), 0.3, cap=cap)
    labels, nuclei = paint(shape, cells, rng, roughness=float(rng.uniform(0.0, 0.08)),
                           polygonal=float(rng.uniform(0.0, 0.3)))
    return _multiplex(rng, shape, "lymphocytes", cells, labels, nuclei, "CD45", "membrane", rim_width=1,
                      extra=("CD3",))


def _large(rng, shape):
    size = float(rng.uniform(30, 62))
    mask = _tissue_mask(rng, shape, rng.uniform(0.5, 0.9), 800.0)
    cells = _cells_in(rng, shape, mask, (size * 0.8, size * 1.2), rng.uniform(0.95, 1.4), (1.0, 1.8),
                      (0.2, 0.4), 0.9)
    labels, nuclei = paint(shape, cells, rng, roughness=float(rng.uniform(0.03, 0.15)),
                           polygonal=float(rng.uniform(0.0, 0.2)))
    return _multiplex(rng, shape, "large", cells, labels, nuclei, "Phalloidin", "cytoplasm", extra=("Tubulin",))


HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])


def _brightfield(rng, shape):
    """H&E by Beer–Lambert: optical density = hematoxylin·H + eosin·E, RGB = white·exp(−OD)."""
    size = float(np.exp(rng.uniform(np.log(9), np.log(28))))
    mask = _tissue_mask(rng, shape, rng.uniform(0.4, 0.85), float(rng.uniform(300, 900)))
    cells = _cells_in(rng, shape, mask, (size * 1.6, size * 2.6), rng.uniform(0.8, 1.3), (1.0, 2.0),
                      (0.5, 0.65), 0.5)
    cell_labels, nuclei = paint(shape, cells, rng, roughness=float(rng.uniform(0.05, 0.2)),
                                polygonal=float(rng.uniform(0.0, 0.4)))
    nuclei = relabel_sequential(_largest_pieces(nuclei.astype(np.int32)))[0].astype(np.uint32)
    n = int(nuclei.max())
    h_level = per_cell(nuclei, 0.5 + 0.5 * brightness(rng, n, float(rng.uniform(1.2, 3)))) * texture(
        rng, shape, float(rng.uniform(2, 4)), float(rng.uniform(0.1, 0.5)))
    strength = float(rng.uniform(0.8, 2.0))
    hematoxylin = strength * h_level + float(rng.uniform(0.02, 0.15)) * mask
    eosin = float(rng.uniform(0.2, 0.8)) * (mask | (cell_labels > 0)) * texture(rng, shape, 6.0, 0.4)
    od = hematoxylin[..., None] * HEMATOXYLIN + eosin[..., None] * EOSIN
    blur = float(rng.uniform(0.5, 1.8))
    od = ndimage.gaussian_filter(od, (blur, blur, 0))
    white = np.array([rng.uniform(0.88, 1.0) for _ in range(3)])
    light = 1 - float(rng.uniform(0.0, 0.15)) * smooth_field(rng, shape, 900.0)
    rgb = 255 * white * np.exp(-od) * light[..., None]
    rgb += rng.normal(0, rng.uniform(1, 6), rgb.shape)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return StyleImage("brightfield", image, ("R", "G", "B"), nuclei, nuclei.copy(), (), (), stain="brightfield",
                      params={"nucleus": size, "blur": blur})


def _tidy(labels, nuclei):
    labels = _largest_pieces(labels.astype(np.int32))
    labels, forward, _ = relabel_sequential(labels)
    nuclei = np.where(labels > 0, forward[nuclei], 0)
    return labels.astype(np.uint32), nuclei.astype(np.uint32)


_RECIPES = {
    "nuclei": _nuclei,
    "epithelium": _epithelium,
    "stroma": _stroma,
    "lymphocytes": _lymphocytes,
    "large": _large,
    "brightfield": _brightfield,
    "envelope": _envelope,
}


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB -> (H, W) float32 luminance in [0, 1], as ``skimage.color.rgb2gray`` weighs it (the
    published CellSAM converts stained images so and feeds them as the whole-cell channel)."""
    weights = np.array([0.2125, 0.7154, 0.0721], np.float32)
    scale = 255.0 if rgb.dtype == np.uint8 else float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind == "u" else 1.0
    return np.tensordot(weights, rgb.astype(np.float32) / scale, axes=1)
