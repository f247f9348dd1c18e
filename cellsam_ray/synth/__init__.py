"""Synthetic multiplexed tissue slides with ground-truth cells: the project's test and demo data.

``fields`` (chunk-invariant random fields), ``cells`` (where the cells and nuclei are), ``markers`` (what
each channel stains), ``tissue`` (forming the image of any region), ``writer`` (writing OME-Zarr),
``styles`` (the family of named styles, ``tissue`` among them, that the bundled model is trained on).
"""

from cellsam_ray.synth.styles import STYLES, StyleImage, render_style
from cellsam_ray.synth.tissue import Region, TissueModel

__all__ = ["LABEL_NAME", "STYLES", "Region", "SlideInfo", "StyleImage", "TissueModel", "render_style",
           "write_synthetic_slide"]
_WRITER = ("LABEL_NAME", "SlideInfo", "write_synthetic_slide")


def __getattr__(name: str):
    """The writer's names, imported on first use: rendering tissue needs no zarr (the GPU check has none)."""
    if name in _WRITER:
        from cellsam_ray.synth import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
