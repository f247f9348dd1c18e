"""Seam-correct merging of per-window detections into one label image.

Stages, each a plain function on plain records (``CellSet``), so Ray only schedules them:
``candidates`` (segment: a window's detections -> candidates in level pixels), ``reconcile`` (reconcile:
the home tile keeps or drops each candidate; then the ids, from a prefix sum of counts), ``rasterise``
(paint: a core's label pixels).
"""
