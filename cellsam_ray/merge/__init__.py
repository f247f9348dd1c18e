"""Seam-correct merging of per-window detections into one label image.

Stages, each a plain function on plain records (``CellSet``), so Ray only schedules them:
``candidates`` (A: a window's detections -> candidates in level pixels), ``reconcile`` (B: the home tile
keeps or drops each candidate; C: ids from a prefix sum of counts), ``rasterise`` (D: paint a core).
"""
