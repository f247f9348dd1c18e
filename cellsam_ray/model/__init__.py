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
- ``segmenter``: CellSAM behind the pipeline's segmenter contract; ``geometry``: its window sizes.

The package imports nothing itself, so a module such as ``geometry`` or ``config`` does not pull in torch.
It only makes segment-anything's networks importable where torchvision is not installed (a GPU check
machine): that package's ``__init__`` imports its predictor and automatic mask generator, which need
torchvision, while ``segment_anything.modeling``, all CellSAM uses, does not.
"""

import importlib.util
import sys


def _segment_anything_without_torchvision() -> None:
    """Register segment-anything's package module unexecuted when torchvision is missing, so that its
    ``modeling`` subpackage imports on its own."""
    try:
        present = importlib.util.find_spec("torchvision") is not None
    except ImportError:
        present = False
    if present or "segment_anything" in sys.modules:
        return
    spec = importlib.util.find_spec("segment_anything")
    if spec is not None:
        sys.modules["segment_anything"] = importlib.util.module_from_spec(spec)


_segment_anything_without_torchvision()
