"""Measurements, apart from the product: no product module imports this package but the ``bench`` command.

- ``pipeline``: the whole-slide benchmark behind ``cellsam-ray bench``.
- ``model``: reference against fast inference per tile; ``host``: the host work around the networks.
- ``merge``: the stages after the model (reconcile, paint, pyramid, table) on dense and sparse slides.
- ``driver``: the driver's CPU per tile, and a profile of where it goes.
- ``gpu_check``: the one prepared run a GPU machine does (it has no Ray or zarr).
"""
