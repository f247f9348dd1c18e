"""What every process of a run does, as plain functions on plain records, without Ray.

- ``plan``: the survey of the slide and its model, and the plan of the run's windows (``SlidePlan``), which
  travels to every process; ``pixels``, ``overview``, ``intensity``, ``stain``: reading pixels, a coarse
  look, the slide-wide scales and the tissue mask, per stain.
- ``source``: a model worker's window reader and its segmenter.
- ``stages``: segment, reconcile, paint and the per-tile table sums, by name; ``labels_out``: the label
  arrays, their chunks and the pyramid built from them; ``workstore``: the per-tile results under the work
  prefix that make a run resumable.

``driver`` decides what runs where and when; it calls these.
"""
