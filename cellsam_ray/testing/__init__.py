"""Real parts for the tests and the demo, apart from the product: no product module imports this package.

- ``s3``: moto's S3 server on 127.0.0.1 and the environment that keeps every AWS client on it.
- ``cluster``: local Ray clusters (one node, joined nodes, the fake multi-node autoscaler), ended by session.
- ``checks``: the OME-Zarr validator, checksums, relabelling equality, the shared reference data.
- ``ecosystem``: slides as other tools write them (ome-zarr-py, bioformats2raw, napari's layout).
- ``oracle`` and ``faults``: segmenters that answer with the ground truth, and that fail on purpose.
"""
