"""The CellSAM network, its sizes and its weights.

- ``config``: :class:`CellSAMConfig`, every size in one pydantic model; presets and JSON files.
- ``sam``: SAM composed from segment-anything's modules with sizes from the config.
- ``rcda``: row-column decoupled attention, Anchor-DETR's attention.
- ``cellfinder``: the box detector (Anchor-DETR on a SAM ViT trunk) and its top-k post-processing.
- ``network``: :class:`CellSAM`, the composed module keyed like the released checkpoint.
- ``weights``: strict checkpoint loading from paths or fsspec URLs, with a per-node cache.
"""

from cellsam_ray.model.cellfinder import CellFinder, detector_topk
from cellsam_ray.model.config import CellSAMConfig, load_config
from cellsam_ray.model.network import CellSAM, build_cellsam
from cellsam_ray.model.weights import load_cellsam, load_checkpoint_state

__all__ = [
    "CellFinder",
    "CellSAM",
    "CellSAMConfig",
    "build_cellsam",
    "detector_topk",
    "load_cellsam",
    "load_checkpoint_state",
    "load_config",
]
