"""What the segmenter sees of a slide's channels, for each kind of staining (``--stain``).

Each stain is an object the plan and the window reader ask, as NGFF versions are:

- which channels to read and how they form the roles (nuclear, whole-cell) of a window;
- the slide-wide normalisation, from the planning overview;
- a window's roles from its raw pixels;
- the signal the tissue mask thresholds, high where tissue is;
- what a window is padded with past the slide's edge: its background (black in fluorescence, white glass
  in brightfield, where black would look like one large stained nucleus).

**Fluorescence** (the default: multiplexed immunofluorescence, CODEX, ...): the user names the nuclear and
whole-cell channels; each role is the brightest of its channels, each normalised between the slide-wide
percentiles; tissue is bright on a dark background.

**Brightfield** (H&E, IHC): an RGB image (a ``c`` axis of 3 channels, or 4 with alpha) whose colours are the
input; no channel roles are named. The published CellSAM expects a stained image condensed to one grey
channel (``skimage.color.rgb2gray``'s luminance, as its H&E example does), and lays one channel out as the
whole-cell channel with the nuclear one blank; a window here is exactly that, (blank, grey), normalised
between the grey's slide-wide percentiles and not inverted. Transparent pixels are glass (composited over
white). Tissue is darker than glass, so its signal is how far a pixel is below the glass's brightness.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np

from cellsam_ray.errors import UserError
from cellsam_ray.pipeline.intensity import ChannelScale, channel_scales, combine_roles

# ITU-R BT.709 luma weights, the ones skimage.color.rgb2gray uses.
LUMA = (0.2125, 0.7154, 0.0721)


class Stain:
    name: ClassVar[str]

    def channels(self, nuclear: list[int], whole_cell: list[int], shape: dict[str, int],
                 dtype: np.dtype) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """``(channels, roles)``: channel-axis indices to read, and per role its indices into ``channels``.

        ``nuclear`` and ``whole_cell`` are the channels the user named (already resolved to indices);
        ``shape`` maps each axis to its size. UserError for an image this stain cannot read.
        """
        raise NotImplementedError

    def scales(self, overview: np.ndarray, dtype: np.dtype) -> tuple[ChannelScale, ...]:
        """The slide-wide normalisation from the planning overview (channels read, y, x)."""
        raise NotImplementedError

    def window(self, raw: np.ndarray, roles: Sequence[Sequence[int]], scales: Sequence[ChannelScale],
               dtype: np.dtype) -> np.ndarray:
        """The segmenter's (roles, y, x) float32 input from raw pixels (channels read, y, x) of ``dtype``."""
        raise NotImplementedError

    def tissue_signal(self, overview: np.ndarray, roles: Sequence[Sequence[int]],
                      scales: Sequence[ChannelScale], dtype: np.dtype) -> np.ndarray:
        """(y, x) signal of the overview for the tissue mask: near 0 on glass, higher on tissue."""
        raise NotImplementedError

    def background(self, roles: int) -> tuple[float, ...]:
        """Each role's value where nothing is, on glass: what a window is padded with past the slide's edge."""
        return (0.0,) * roles

    def __repr__(self) -> str:
        return f"{self.name} stain"


class _Fluorescence(Stain):
    name = "fluorescence"

    def channels(self, nuclear, whole_cell, shape, dtype):
        channels = tuple(dict.fromkeys(nuclear + whole_cell))
        roles = tuple(tuple(channels.index(c) for c in group) for group in (nuclear, whole_cell) if group)
        return channels, roles

    def scales(self, overview, dtype):
        return tuple(channel_scales(overview))

    def window(self, raw, roles, scales, dtype):
        return combine_roles(raw, [list(r) for r in roles], list(scales))

    def tissue_signal(self, overview, roles, scales, dtype):
        return combine_roles(overview, [list(r) for r in roles], list(scales)).max(axis=0)


class _Brightfield(Stain):
    name = "brightfield"

    def channels(self, nuclear, whole_cell, shape, dtype):
        if nuclear or whole_cell:
            raise UserError("--stain brightfield takes the image's colour channels as they are: "
                            "drop --nuclear and --whole-cell")
        axes = "".join(shape)
        if shape.get("c") not in (3, 4):
            found = f"a c axis of {shape['c']}" if "c" in shape else f"no c axis (its axes are {axes})"
            raise UserError(f"--stain brightfield needs an RGB image, a c axis of 3 channels (4 with alpha); "
                            f"this one has {found}")
        if np.dtype(dtype).kind != "u":
            raise UserError(f"--stain brightfield needs RGB of unsigned integers (uint8, uint16), not {dtype}")
        channels = tuple(range(shape["c"]))
        return channels, ((), (0, 1, 2))  # nuclear blank, whole-cell from the colours

    def scales(self, overview, dtype):
        return tuple(channel_scales(self.grey(overview, dtype)[None]))

    def window(self, raw, roles, scales, dtype):
        grey = combine_roles(self.grey(raw, dtype)[None], [[0]], list(scales))[0]
        return np.stack([np.zeros_like(grey), grey])

    def tissue_signal(self, overview, roles, scales, dtype):
        normalised = combine_roles(self.grey(overview, dtype)[None], [[0]], list(scales))[0]
        return 1.0 - normalised  # glass is at the top of the grey's range

    def background(self, roles):
        return (0.0, 1.0)  # the blank nuclear role, and glass at the top of the grey's range

    @staticmethod
    def grey(rgb: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Luminance (y, x) float32, in the pixels' own units, of (3 or 4, y, x) RGB(A) over white."""
        full = float(np.iinfo(dtype).max)
        grey = sum(np.float32(w) * rgb[i].astype(np.float32) for i, w in enumerate(LUMA))
        if len(rgb) == 4:
            alpha = rgb[3].astype(np.float32) / np.float32(full)
            grey = grey * alpha + np.float32(full) * (1 - alpha)
        return grey.astype(np.float32)


FLUORESCENCE = _Fluorescence()
BRIGHTFIELD = _Brightfield()
STAINS: dict[str, Stain] = {s.name: s for s in (FLUORESCENCE, BRIGHTFIELD)}


def stain(name: str) -> Stain:
    """The stain object for ``--stain`` (the spec has checked the name)."""
    return STAINS[name]
