"""Reading and writing OME-Zarr in any storage: ``storage`` (where), ``ngff`` (what: images and label
images, NGFF 0.4 and 0.5), ``pyramid`` (coarser levels, one whole chunk at a time)."""
