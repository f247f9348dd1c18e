"""The per-cell table: every cell's position, shape, detector scores and intensity in every channel.

It is measured where the labels are painted (the paint stage), so the image is read once more per core and no
label is read back: ``measure`` sums each cell's pixels in one core (a cell crossing a seam gets one
partial row per core), ``stage`` combines the partial rows of the cells homed at a tile and turns sums
into columns (``columns``), and ``write`` streams the rows to ``labels/<name>/cells.parquet`` in id
order, with an optional AnnData copy. ``schema`` says what the columns are, once.
"""
