"""Training windows from the synthetic style family, with scale, intensity and channel-presence augmentation.

Each (style, seed) image is drawn in memory (``synth.styles``), scaled to [0, 1] per channel with the
whole-slide pipeline's own percentiles taken over the whole image (``pipeline.intensity``; the pipeline
takes them from a coarse level of the same slide), and cut into windows. Each window draws:

- **a channel layout**, so that the model takes any of CellSAM's three: nuclear + whole-cell; nuclear
  only (then the targets are the nuclei, as CellSAM segments nuclei when given no whole-cell channel);
  whole-cell only. Nuclear-only styles go in the nuclear slot, or in the whole-cell slot as a grayscale
  image does (``segment-image``'s one-channel input); brightfield goes as grayscale (``styles.grayscale``,
  the published conversion) in the whole-cell slot, now and then in the nuclear slot;
- **a scale**: the window's side is 256 × s (s log-uniform in ``SCALE``) and ``prepare_tile`` stretches it
  to the model's input, so cells appear 1/s times their drawn size;
- **an intensity change** per channel: gamma and gain (``GAMMA``, ``GAIN``) after the slide scaling.

The flips and right-angle turns are drawn per step by ``make_batch``. Windows with more cells than
``MAX_CELLS`` are dropped (the model has 600 queries), and most windows without cells.
"""

from __future__ import annotations

import numpy as np

from cellsam_ray.pipeline.intensity import channel_scales, combine_roles
from cellsam_ray.synth.styles import STYLES, StyleImage, grayscale, render_style
from cellsam_ray.train.data import LabelledImage

SCALE = (0.7, 1.45)
GAMMA = (0.7, 1.4)
GAIN = (0.6, 1.0)
MAX_CELLS = 520
KEEP_EMPTY = 0.15  # share of windows without cells that are kept
LAYOUTS = {"both": 0.6, "nuclear": 0.2, "whole-cell": 0.2}
"""How often a style with both roles is shown with both, with its nuclear channel alone (targets: the
nuclei) or with its whole-cell channel alone (targets: the cells)."""


def style_windows(styles: list[str], seeds: list[int], size: int, window: int, *, augment: bool = True,
                  seed: int = 0) -> list[LabelledImage]:
    """Augmented ``window``-pixel windows of a ``size``² image of every style and seed."""
    for style in styles:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    out: list[LabelledImage] = []
    for style in styles:
        for image_seed in seeds:
            drawn = render_style(style, (size, size), image_seed)
            rng = np.random.default_rng([seed, image_seed, STYLES.index(style), 7])
            out += windows_of(drawn, window, rng, augment=augment)
    return out


def scaled_roles(drawn: StyleImage) -> tuple[np.ndarray, np.ndarray | None]:
    """The nuclear and whole-cell role images (H, W) in [0, 1], scaled as the pipeline scales a slide."""
    if drawn.stain == "brightfield":
        gray = grayscale(drawn.image)[None]
        return None, combine_roles(gray, [[0]], channel_scales(gray))[0]
    names = list(drawn.channel_names)
    roles = [[names.index(n) for n in drawn.nuclear]]
    if drawn.whole_cell:
        roles.append([names.index(n) for n in drawn.whole_cell])
    scaled = combine_roles(drawn.image, roles, channel_scales(drawn.image))
    return scaled[0], (scaled[1] if len(scaled) > 1 else None)


def windows_of(drawn: StyleImage, window: int, rng: np.random.Generator, *, augment: bool) -> list[LabelledImage]:
    """The drawn image cut into windows: a regular grid, or with ``augment`` as many windows as the grid
    has, each of a drawn side at a random place (layout, scale and intensity drawn per window)."""
    nuclear, whole = scaled_roles(drawn)
    height, width = drawn.labels.shape
    if augment:
        places = []
        for _ in range(max(1, round(height * width / window**2))):
            side = min(int(round(window * np.exp(rng.uniform(*np.log(SCALE))))), height, width)
            places.append((int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side))
    else:
        places = [(y, x, window) for y in range(0, height - window + 1, window)
                  for x in range(0, width - window + 1, window)]
    items = [_window(drawn, nuclear, whole, y, x, side, rng, augment) for y, x, side in places]
    return [item for item in items if item is not None]


def _window(drawn, nuclear, whole, y, x, side, rng, augment):
    crop = (slice(y, y + side), slice(x, x + side))
    cells, nuclei = drawn.labels[crop], drawn.nuclei[crop]
    if nuclear is not None and whole is not None:
        layout = str(rng.choice(list(LAYOUTS), p=list(LAYOUTS.values()))) if augment else "both"
    elif whole is None:
        layout = "nuclear"
    else:
        layout = "whole-cell"
    truth = nuclei if layout == "nuclear" and whole is not None else cells
    count = len(np.unique(truth)) - 1
    if count > MAX_CELLS or (count == 0 and rng.random() > KEEP_EMPTY):
        return None
    image = np.zeros(truth.shape + (3,), np.float32)
    if layout in ("both", "nuclear") and nuclear is not None:
        image[..., 1] = nuclear[crop]
    if layout in ("both", "whole-cell") and whole is not None:
        image[..., 2] = whole[crop]
    if layout == "nuclear" and whole is None and augment and rng.random() < 0.3:
        image = image[..., [0, 2, 1]]  # a nuclear-only image given as one grayscale channel
    if layout == "whole-cell" and nuclear is None and augment and rng.random() < 0.25:
        image = image[..., [0, 2, 1]]  # brightfield given in the nuclear slot
    if augment:
        for c in (1, 2):
            if image[..., c].any():
                gamma, gain = rng.uniform(*GAMMA), rng.uniform(*GAIN)
                image[..., c] = np.clip(gain * image[..., c] ** gamma, 0, 1)
    return LabelledImage(np.ascontiguousarray(image), truth.astype(np.int32))
