"""cellsam-ray: CellSAM cell segmentation of whole-slide OME-Zarr images, distributed on Ray."""

__version__ = "0.1.0"
