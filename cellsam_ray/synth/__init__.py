"""Synthetic multiplexed tissue slides with ground-truth cells: the project's test and demo data.

``fields`` (chunk-invariant random fields), ``cells`` (where the cells and nuclei are), ``markers`` (what
each channel stains), ``tissue`` (forming the image of any region), ``writer`` (writing OME-Zarr).
"""

from cellsam_ray.synth.tissue import Region, TissueModel
from cellsam_ray.synth.writer import LABEL_NAME, SlideInfo, write_synthetic_slide

__all__ = ["LABEL_NAME", "Region", "SlideInfo", "TissueModel", "write_synthetic_slide"]
