"""What the driver decides and schedules: the only Ray code of the whole-slide run.

- ``api``: ``segment(spec)``, the run from start to report; ``windows``: the model and its windows, decided
  once, then the plan; ``cell_size``: the first look at the cells that sizes the bundled model's windows.
- ``lifecycle``: the label's life (lease, work prefix, swap into place, report); ``lease``: one run per
  label at a time.
- ``execution``: Ray's actors and tasks over ``pipeline``'s functions; ``capacity``: how many model actors
  the cluster holds or can grow; ``stats``: what the run counts (progress, the report's figures).
- ``streaming`` and ``extent``: which work can start when, and where labels can be non-zero.
"""
