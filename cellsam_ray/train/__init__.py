"""Training and fine-tuning CellSAM: the code the published release does not ship.

- ``sources``: labelled images from OME-Zarr slides (with a label image), folders of image + label pairs or
  synthetic tissue (``synthetic``: drawn in the named styles).
- ``data``: those images prepared with the published preprocessing; batches with their targets.
- ``box_ops``: box formats and generalised IoU.
- ``matcher``: Hungarian matching of CellFinder's queries to the true cells.
- ``losses``: the DETR objective (focal classification, L1 and GIoU boxes) and the mask-decoder losses.
- ``loop``: settings, which parts train, the training step and loop.
- ``checkpoint``: saving in the v1.2 key layout, so ``load_cellsam`` loads the result strictly.
- ``distributed``: the same loop as data-parallel Ray Train workers.
- ``validate``: F1 of a model on labelled tiles, through the inference code.
"""
