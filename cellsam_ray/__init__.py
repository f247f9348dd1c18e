"""cellsam-ray: CellSAM cell segmentation of whole-slide OME-Zarr images, distributed on Ray.

The public face, what ``cellsam-ray segment`` does from Python::

    from cellsam_ray import SegmentSpec, open_labels, segment

    report = segment(SegmentSpec(input="s3://bucket/slide.ome.zarr", nuclear=["DAPI"]))
    cells = open_labels("s3://bucket/slide.ome.zarr").array(0)   # labels/cells, level 0
    pyramid = open_labels("s3://bucket/slide.ome.zarr").dask_levels()   # every level, lazy dask arrays

The three names are imported on first use, so that importing one part of the package costs that part
alone: the model's code runs where Ray and zarr are not installed (a GPU check machine).
notes/architecture.md maps the rest of the package.
"""

from importlib import import_module

from cellsam_ray.version import __version__

__all__ = ["SegmentSpec", "__version__", "open_labels", "segment"]
_FACE = {"segment": "cellsam_ray.driver.api", "SegmentSpec": "cellsam_ray.spec", "open_labels": "cellsam_ray.io.ngff"}


def __getattr__(name: str):
    if name in _FACE:
        return getattr(import_module(_FACE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
