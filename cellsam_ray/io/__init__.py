"""Reading and writing data in any storage: ``storage`` (where: local paths and fsspec URLs), ``ngff`` (what:
OME-Zarr images and label images, NGFF 0.4 and 0.5), ``layouts`` (where an image sits in a converter's
tree), ``pyramid`` (coarser levels, one whole chunk at a time), ``damage`` (naming a chunk that cannot be
decoded), ``images`` (single .npy/.tif/.png images), ``label_sources`` (a label image as a user names it: a file or
an OME-Zarr label)."""
