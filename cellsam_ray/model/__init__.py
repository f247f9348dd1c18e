"""The CellSAM network, its sizes, its weights and its two inference modes.

Network and weights:

- ``config``: :class:`CellSAMConfig`, every size in one pydantic model; presets and JSON files.
- ``sam``: SAM composed from segment-anything's modules with sizes from the config.
- ``rcda``: row-column decoupled attention, Anchor-DETR's attention.
- ``cellfinder``: the box detector (Anchor-DETR on a SAM ViT trunk) and its top-k post-processing.
- ``network``: :class:`CellSAM`, the composed module keyed like the released checkpoint.
- ``weights``: strict checkpoint loading from paths or fsspec URLs, with a per-node cache.

Inference:

- ``preprocess``, ``boxes`` (with ``two_means``), ``postprocess``: the published steps around the networks.
- ``reference``: the published pipeline step for step; ``fast``: the same answers for batches of tiles,
  from ``encoders``, ``decoder`` and ``paint``; ``precision``: fp32, tf32 or bf16.
- ``cellsam``: CellSAM behind the pipeline's segmenter contract, and the modes by name; ``geometry``: its
  window sizes; ``bundled``: the facts of the demo model shipped in the package.

The package imports nothing itself, so a module such as ``geometry`` or ``config`` does not pull in torch.
"""
