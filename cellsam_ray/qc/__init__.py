"""Visual QC of a segmentation run: PNGs beside the labels that a person can look at in a second.

``render`` draws (numpy only); ``views`` decides what to show (an overview of the slide at a coarse
level, the busiest tiles, the seams where most copies were reconciled), reads it and writes the PNGs.
"""
