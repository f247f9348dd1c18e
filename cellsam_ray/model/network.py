"""The composed CellSAM module: two SAM branches and CellFinder, keyed like the released checkpoint."""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from cellsam_ray.model.cellfinder import CellFinder
from cellsam_ray.model.config import CellSAMConfig
from cellsam_ray.model.sam import PIXEL_MEAN, PIXEL_STD, build_sam


class CellSAM(torch.nn.Module):
    """``model`` (legacy SAM), ``cellfinder`` (detector) and ``model_cp`` (the SAM inference uses).

    The released v1.2 checkpoint carries both SAM copies; ``model`` is only used by legacy
    checkpoints without ``model_cp.*`` keys, which the loader marks with ``adv_mode = False``.
    Attribute order matches the checkpoint's key order.
    """

    def __init__(self, config: CellSAMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = build_sam(config)
        self.cellfinder = CellFinder(config)
        self.model_cp = build_sam(config)
        self.adv_mode = True

    def drop_unused_sam(self) -> CellSAM:
        """Remove the SAM branch inference does not run (``model`` of a v1.2 checkpoint, ~370 MB of weights
        at v1.2 sizes; ``model_cp`` of a legacy one, which shares its tensors). For inference only: the
        state dict then no longer has the checkpoint's layout."""
        if self.adv_mode:
            self.model = None
        else:
            self.model_cp = None
        return self

    @property
    def sam(self) -> Sam:
        """The SAM branch to run: ``model_cp`` for v1.2 checkpoints, ``model`` for legacy ones."""
        return self.model_cp if self.adv_mode else self.model

    def reset_pixel_statistics(self) -> None:
        """Rebuild SAM's non-persistent pixel mean/std buffers on the parameters' device.

        Loading with ``assign=True`` into a model built on the meta device replaces every checkpoint
        tensor but not these constants, which no checkpoint stores.
        """
        device = self.sam.image_encoder.pos_embed.device
        for sam in (branch for branch in (self.model, self.model_cp) if branch is not None):
            sam.pixel_mean = torch.tensor(PIXEL_MEAN, device=device).view(-1, 1, 1)
            sam.pixel_std = torch.tensor(PIXEL_STD, device=device).view(-1, 1, 1)


def build_cellsam(config: CellSAMConfig) -> CellSAM:
    """A randomly initialised CellSAM in eval mode (wrap in ``torch.device("meta")`` for shapes only)."""
    return CellSAM(config).eval()
