"""The per-cell outputs: every cell's position, shape, detector scores and intensity in every channel, and
its outline.

It is measured where the labels are painted (the paint stage), so the image is read once more per core and no
label is read back: ``measure`` sums each cell's pixels in one core (a cell crossing a seam gets one
partial row per core), ``per_tile`` combines the partial rows of the cells homed at a tile and turns sums
into columns (``columns``), and ``write`` streams the rows to ``labels/<name>/cells.parquet`` in id
order, with an optional AnnData copy. ``schema`` says what the columns are, once. ``outlines`` makes each
cell's polygon from the same painted cores (seam cells from their pieces, at their home), and ``geo``
encodes them for ``cells.geojson`` (QuPath) and ``cells.geoparquet`` (GeoPandas, Sopa, SpatialData).
"""
