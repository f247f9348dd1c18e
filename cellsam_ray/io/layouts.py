"""Layouts that hold an OME-Zarr image below the URL a user gives: bioformats2raw's.

bioformats2raw, the converter most slide formats go through, writes a root group marked
``"bioformats2raw.layout": 3`` (NGFF 0.4 "bf2raw"; under ``ome`` in 0.5) whose images, the series, are the
groups that the ``OME`` group's ``series`` attribute lists, or else ``0``, ``1``, ... in order;
``OME/METADATA.ome.xml`` keeps the source file's metadata. Either URL names the image: the root means its
first series, which for slide formats is the scan itself (later ones are the label and macro pictures).
Labels go into that series (``<root>/0/labels/...``), where NGFF readers look for them.
"""

from __future__ import annotations

from typing import Any

import zarr

from cellsam_ray.errors import UserError
from cellsam_ray.io.storage import join_url, open_group

LAYOUT_KEY = "bioformats2raw.layout"
LAYOUT_VERSION = 3


def image_url(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The URL of the image ``url`` names: itself, or the first series of a bioformats2raw root."""
    series = bioformats2raw_series(open_group(url, storage_options), url)
    return url if series is None else join_url(url, series)


def image_group(group: zarr.Group) -> zarr.Group:
    """The image group ``group`` names: itself, or the first series of a bioformats2raw root."""
    series = bioformats2raw_series(group, str(group.store))
    return group if series is None else group[series]


def bioformats2raw_series(group: zarr.Group, where: str) -> str | None:
    """The path of the first series when ``group`` is a bioformats2raw root (and not itself an image)."""
    attrs = dict(group.attrs)
    ome = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    layout = attrs.get(LAYOUT_KEY, ome.get(LAYOUT_KEY))
    if layout is None or "multiscales" in ome:
        return None
    if layout != LAYOUT_VERSION:
        raise UserError(f"{where} has bioformats2raw layout {layout!r}; this version reads layout {LAYOUT_VERSION}")
    listed = _listed_series(group)
    first = listed[0] if listed else "0"
    if first not in group:
        raise UserError(f"{where} is a bioformats2raw root without its image (no series {first!r} in it)")
    return first


def _listed_series(group: zarr.Group) -> list[str]:
    if "OME" not in group:
        return []
    attrs = dict(group["OME"].attrs)
    ome = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    return [str(s) for s in ome.get("series") or []]
