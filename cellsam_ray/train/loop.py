"""The training loop: settings, which parts of CellSAM train, the objective and the optimiser steps.

One step trains both halves of CellSAM on the same batch when neither is frozen:

- CellFinder on the detector input, with the DETR objective at every decoder layer;
- SAM (``model_cp``) on the embedding input, its mask decoder prompted with jittered true boxes.

The loop itself knows nothing about processes: ``fit`` runs it here, ``distributed`` runs it in each
Ray Train worker with the objective wrapped for data-parallel gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from cellsam_ray.device import resolve_device as device_name
from cellsam_ray.errors import UserError
from cellsam_ray.model.config import load_config
from cellsam_ray.model.network import CellSAM, build_cellsam
from cellsam_ray.model.preprocess import sam_pixel_normalize
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.train.data import Batch, TrainingTile, make_batch
from cellsam_ray.train.losses import LossWeights, box_regions, detection_losses, mask_losses
from cellsam_ray.train.matcher import MatchCosts, hungarian_match

Part = Literal["cellfinder-trunk", "cellfinder-head", "sam-trunk", "sam-neck", "prompt-encoder", "mask-decoder"]
PARTS: dict[str, tuple[str, ...]] = {
    "cellfinder-trunk": ("cellfinder.decode_head.backbone.",),
    "cellfinder-head": ("cellfinder.decode_head.input_proj.", "cellfinder.decode_head.transformer."),
    "sam-neck": ("model_cp.image_encoder.neck.",),
    "sam-trunk": ("model_cp.image_encoder.",),  # after the neck: every other encoder weight
    "prompt-encoder": ("model_cp.prompt_encoder.",),
    "mask-decoder": ("model_cp.mask_decoder.",),
}
"""Trainable parts by parameter-name prefix, first match wins. ``model.*`` (the legacy SAM copy, unused
by inference) belongs to none and never trains."""
TRUNKS = ("cellfinder-trunk", "sam-trunk")


class TrainSettings(BaseModel):
    """Everything ``cellsam-ray train`` / ``finetune`` take besides the data."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(default="v1.2", description="Model sizes: a preset or a JSON config.")
    init: str | None = Field(default=None, description="Checkpoint to start from (default: random weights).")
    steps: int = Field(default=1000, gt=0, description="Optimiser steps.")
    batch_size: int = Field(default=4, gt=0, description="Tiles per step and worker.")
    lr: float = Field(default=2e-4, gt=0, description="AdamW learning rate of the heads, decoders and neck.")
    lr_trunk: float | None = Field(default=None, gt=0, description="Learning rate of both ViT trunks (default: lr).")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")
    clip: float | None = Field(default=0.1, gt=0, description="Gradient norm clip (published: 0.1).")
    warmup: int = Field(default=50, ge=0, description="Steps of linear learning-rate warm-up; cosine decay after.")
    freeze: list[Part] = Field(default_factory=list, description="Parts that keep their weights.")
    masks_per_image: int = Field(default=16, gt=0, description="Cells per tile that prompt SAM in a step.")
    box_jitter: float = Field(default=0.1, ge=0, description="Prompt box sides move by up to this share of the box.")
    aux_loss: bool = Field(default=True, description="Supervise every CellFinder decoder layer, not only the last.")
    tie_trunks: bool = Field(default=False, description="One ViT trunk for CellFinder and SAM, trained by both losses.")
    anchors: Literal["grid", "random", "keep"] | None = Field(
        default=None, description="CellFinder's anchor points at the start: a regular grid over the image, "
        "uniform random (Anchor-DETR's init) or as built/loaded (default: grid for fresh weights, the "
        "checkpoint's own with --init).")
    freeze_anchors: bool = Field(default=False, description="Keep the anchor points where they start.")
    local_attention: bool = Field(default=False, description="Start CellFinder's transformer afresh with every "
                                  "RCDA attention looking at its own row and column (with --init: replaces the "
                                  "checkpoint's transformer, keeping its trunk, projection and SAM).")
    match_anchor: float = Field(default=0.0, ge=0, description="Matching cost weight of the L1 distance from a "
                                "query's anchor to a cell's centre (0: plain DETR matching).")
    seed: int = Field(default=0, description="Seeds the initial weights, batch order and augmentation.")
    log_every: int = Field(default=25, gt=0, description="Steps between reported loss averages.")
    checkpoint_every: int | None = Field(default=None, gt=0, description="Steps between checkpoints (default: end).")
    resume: bool = Field(default=False, description="Continue from OUT's last checkpoint and its optimiser state "
                         "(train_state.pt) when OUT has them, at the step it had reached (in-process only).")
    validation_tiles: int = Field(default=0, ge=0, description="Tiles held back from training and scored "
                                  "(F1 at IoU 0.5, through the inference code) before and after (in-process only).")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where training runs in-process.")

    def trainable(self, part: str) -> bool:
        return part not in self.freeze


def part_of(name: str) -> str | None:
    """The trainable part a parameter belongs to, by its state-dict name."""
    return next((part for part, prefixes in PARTS.items() if name.startswith(prefixes)), None)


def initial_model(settings: TrainSettings) -> CellSAM:
    """The starting network: a checkpoint (strictly loaded) or fresh weights; anchors as ``settings.anchors``."""
    config = load_config(settings.config)
    if settings.init:
        net = load_cellsam(settings.init, config)
        # A checkpoint stores tensors shared by several keys once, and loading makes them separate
        # parameters over one storage; the optimiser would then step that memory once per parameter.
        for parameter in net.parameters():
            parameter.data = parameter.data.clone()
    else:
        torch.manual_seed(settings.seed)
        net = build_cellsam(config)
    if settings.local_attention:
        init_local_attention(net)
    start = settings.anchors or ("keep" if settings.init else "grid")
    if start == "grid":
        place_anchors_on_grid(net)
    elif start == "random":
        torch.manual_seed(settings.seed)
        nn.init.uniform_(anchor_points(net), 0, 1)
    if settings.tie_trunks:
        tie_trunks(net)
    return net


LOCAL_FREQUENCY = 5
"""The sine pair of the position embedding the local codes are built from: angular frequency
2π·10000^(−10/128) ≈ 3.06 per image side, the highest whose period (2.05 sides) cannot wrap within [0, 1]."""


@torch.no_grad()
def init_local_attention(net: CellSAM, gain: float = 8.0) -> None:
    """Re-initialise CellFinder's transformer so that every RCDA attention starts local.

    From a random start, RCDA's position embeddings (sines of at most one period per image side) give
    each query a near-uniform attention over a 32-wide map, so every query reads nearly the same blurred
    features; the detector then settles on the same box and score for every query and does not leave
    it (the first bundled model, 1800 steps: every box centre was its anchor plus one constant offset,
    spread 0.08 px; scores spread 0.17 in logits across queries). Here the 1-D position MLP
    (``adapt_pos1d``) is set to turn a coordinate into a code of bumps, one per feature-map column, each
    as wide as a column and ``gain`` high, in the first ``W`` channels (the map's side); and the row/column query and key projections of every head are set to read that
    code (half the heads the first half of the bumps, the other half the second), so a query's
    attention at the start falls on the one or two columns and rows around its anchor. Everything
    else in the transformer (value and output projections, FFNs, self-attention, heads) gets the
    model's own fresh initialisation; the anchor points are left as they are, and the key layout and
    shapes are unchanged.
    """
    transformer = net.cellfinder.decode_head.transformer
    fresh = type(transformer)(net.config).state_dict()
    fresh["position.weight"] = anchor_points(net).clone()  # the anchors are set by ``anchors``
    transformer.load_state_dict(fresh)
    d, heads = transformer.d_model, net.config.cellfinder_nheads
    head_dim = d // heads
    grid = net.config.image_size // net.config.patch_size
    if 2 * head_dim < grid or grid > d:
        raise UserError(f"--local-attention needs 2 × head width ({2 * head_dim}) ≥ map side ({grid})")
    omega = 2 * math.pi * 10000 ** (-2 * LOCAL_FREQUENCY / d)
    centres = (torch.arange(grid) + 0.5) / grid
    tau = math.cos(omega / grid)  # a bump reaches zero one column away from its centre
    sharp = 1 / (1 - tau)  # and peaks at 1
    first, second = transformer.adapt_pos1d[0], transformer.adapt_pos1d[2]
    first.weight.zero_()
    first.bias.zero_()
    # cos(ω(p − c)) = cos(ωp)·cos(ωc) + sin(ωp)·sin(ωc); the embedding holds sin(ωp), cos(ωp) at 2k, 2k+1.
    first.weight[:grid, 2 * LOCAL_FREQUENCY] = sharp * torch.sin(omega * centres)
    first.weight[:grid, 2 * LOCAL_FREQUENCY + 1] = sharp * torch.cos(omega * centres)
    first.bias[:grid] = -sharp * tau
    second.weight.zero_()
    second.bias.zero_()
    second.weight[:grid, :grid] = gain * torch.eye(grid)
    half = (grid + 1) // 2
    attentions = [layer.self_attn for layer in transformer.encoder_layers]
    attentions += [layer.cross_attn for layer in transformer.decoder_layers]
    for attention in attentions:
        weight = attention.in_proj_weight
        for slot in range(4):  # q_row, q_col, k_row, k_col: a head reads one half of the bump code
            block = weight[slot * d : (slot + 1) * d]
            block.zero_()
            for head in range(heads):
                lo = 0 if head % 2 == 0 else half
                count = min(head_dim, (half if head % 2 == 0 else grid - half))
                rows = torch.arange(count) + head * head_dim
                block[rows, lo + torch.arange(count)] = 1.0


def tie_trunks(net: CellSAM) -> None:
    """Make CellFinder's ViT trunk the very modules of SAM's (``model_cp``) encoder trunk.

    The published stage 1 trained one ViT for both branches (its released CellFinder trunk equals the
    ``model`` SAM encoder), and a trunk also trained by the dense mask loss learns cell features much
    sooner than one taught by the set loss alone. Both keys stay in the checkpoint (stored once).
    """
    body, encoder = net.cellfinder.decode_head.backbone.body, net.model_cp.image_encoder
    body.patch_embed, body.blocks, body.pos_embed = encoder.patch_embed, encoder.blocks, encoder.pos_embed


@torch.no_grad()
def place_anchors_on_grid(net: CellSAM) -> None:
    """Spread CellFinder's learned anchor points on a regular grid instead of uniformly at random.

    With a few hundred queries for a few hundred cells, a random start leaves clumps and holes, and the
    Hungarian matching then pulls queries across the tile for the first many steps; a grid gives every
    query its own neighbourhood from the start. The anchors stay learned parameters unless
    ``freeze_anchors`` is set; either way they keep their key and shape in the checkpoint.
    """
    position = anchor_points(net)
    count = position.shape[0]
    rows = max(1, math.isqrt(count))
    cols = math.ceil(count / rows)
    y, x = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
    position.copy_(torch.stack((x.flatten(), y.flatten()), dim=-1)[:count])


def anchor_points(net: CellSAM) -> nn.Parameter:
    """CellFinder's (Q, 2) anchor points (x, y) in [0, 1]: the ``position`` embedding's weight."""
    return net.cellfinder.decode_head.transformer.position.weight


def freeze_parts(net: CellSAM, settings: TrainSettings) -> list[nn.Parameter]:
    """Set ``requires_grad`` by part; the trainable parameters, each once.

    A parameter under several names (CellFinder's aliased heads, tied trunks) trains only if every part
    it belongs to does. ``freeze_anchors`` keeps the anchor points (a part of the head) fixed.
    """
    parts: dict[int, list[str | None]] = {}
    objects: dict[int, nn.Parameter] = {}
    for name, parameter in net.named_parameters(remove_duplicate=False):
        parts.setdefault(id(parameter), []).append(part_of(name))
        objects[id(parameter)] = parameter
    trainable = []
    fixed = {id(anchor_points(net))} if settings.freeze_anchors else set()
    for key, parameter in objects.items():
        train = key not in fixed and all(part is not None and settings.trainable(part) for part in parts[key])
        parameter.requires_grad_(train)
        if train:
            trainable.append(parameter)
    if not trainable:
        raise UserError("every part is frozen: nothing would train")
    return trainable


def parameter_groups(net: CellSAM, settings: TrainSettings) -> list[dict]:
    """AdamW groups: the ViT trunks at ``lr_trunk``, everything else trainable at ``lr``."""
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    seen = set()
    for name, parameter in net.named_parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            groups[part_of(name) in TRUNKS].append(parameter)
    rates = {True: settings.lr_trunk or settings.lr, False: settings.lr}
    return [{"params": params, "lr": rates[trunk]} for trunk, params in groups.items() if params]


class Objective(nn.Module):
    """CellSAM with its training loss as ``forward``: what data-parallel training wraps and calls."""

    def __init__(self, net: CellSAM, settings: TrainSettings) -> None:
        super().__init__()
        self.net = net
        self.aux_loss = settings.aux_loss
        self.weights = LossWeights()
        self.costs = MatchCosts(anchor=settings.match_anchor)
        self.detects = settings.trainable("cellfinder-trunk") or settings.trainable("cellfinder-head")
        self.segments = any(settings.trainable(p) for p in ("sam-trunk", "sam-neck", "prompt-encoder", "mask-decoder"))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted total under ``loss`` and each unweighted term (last decoder layer's) for logging."""
        device = next(self.net.parameters()).device
        terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=device)
        if self.detects:
            total = total + self._detection(batch, device, terms)
        if self.segments:
            total = total + self._masks(batch, device, terms)
        terms["loss"] = total
        return terms

    def _detection(self, batch: Batch, device: torch.device, terms: dict[str, Tensor]) -> Tensor:
        finder = self.net.cellfinder
        images = batch.detect.to(device)
        layers = finder.forward_layers(images) if self.aux_loss else [finder(images)]
        targets = [b.to(device) for b in batch.boxes]
        num_cells = _global_count(sum(len(t) for t in targets), device)
        w = self.weights
        total = torch.zeros((), device=device)
        anchors = anchor_points(self.net).detach().repeat(finder.decode_head.transformer.num_pattern, 1)
        for logits, boxes in layers:
            matches = [hungarian_match(logits[i].detach(), boxes[i].detach(), targets[i], self.costs, anchors)
                       for i in range(len(targets))]
            losses = detection_losses(logits, boxes, targets, [(q.to(device), t.to(device)) for q, t in matches],
                                      num_cells, w)
            total = total + w.classification * losses["classification"] + w.l1 * losses["l1"] + w.giou * losses["giou"]
        terms.update({k: v.detach() for k, v in losses.items()})
        return total

    def _masks(self, batch: Batch, device: torch.device, terms: dict[str, Tensor]) -> Tensor:
        sam = self.net.model_cp
        size = sam.image_encoder.img_size
        embeddings = sam.image_encoder(sam_pixel_normalize(batch.embed.to(device)))
        dense_pe = sam.prompt_encoder.get_dense_pe()
        logits, truths, ious, regions = [], [], [], []
        for i, prompts in enumerate(batch.prompts):
            if len(prompts) == 0:
                continue
            sparse, dense = sam.prompt_encoder(points=None, boxes=prompts.to(device), masks=None)
            low_res, iou = sam.mask_decoder(image_embeddings=embeddings[i : i + 1], image_pe=dense_pe,
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=False)
            logits.append(F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)[:, 0])
            truths.append(batch.masks[i].to(device))
            ious.append(iou[:, 0])
            regions.append(box_regions(prompts.to(device), size))
        if not logits:  # no cell in the batch: keep SAM in the graph with a zero loss (data-parallel needs it)
            zero = embeddings.sum() * 0
            terms.update(mask_bce=zero.detach(), mask_dice=zero.detach(), mask_iou=zero.detach())
            return zero
        losses = mask_losses(torch.cat(logits), torch.cat(truths), torch.cat(ious), torch.cat(regions))
        terms.update({k: v.detach() for k, v in losses.items()})
        w = self.weights
        return w.mask_bce * losses["mask_bce"] + w.mask_dice * losses["mask_dice"] + w.mask_iou * losses["mask_iou"]


def _global_count(count: int, device: torch.device) -> float:
    """The mean number of true cells per data-parallel worker (at least 1): the losses' normaliser."""
    value = torch.tensor(float(count), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return max(float(value), 1.0)


def schedule(settings: TrainSettings) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine decay to a tenth."""
    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


Report = Callable[[int, dict[str, float], bool], None]
"""Called every ``log_every`` steps and at the end with (step, mean losses, whether it is the last)."""


State = Callable[[dict], None]
"""Called after each checkpoint report with the optimiser state to resume from (``run_steps``' ``resume``)."""


def run_steps(
    objective: nn.Module, net: CellSAM, tiles: list[TrainingTile], settings: TrainSettings, report: Report,
    *, rank: int = 0, resume: dict | None = None, keep_state: State | None = None,
) -> None:
    """The optimiser steps; ``objective`` is ``Objective(net)`` or a data-parallel wrapper of it.

    ``resume`` (a state ``keep_state`` was given) continues at the step after the one it was saved at,
    with the optimiser's moments and the schedule where they were; the batch order after a resume is
    drawn afresh (seeded by the step), so a resumed run is as good as an unbroken one but not identical.
    """
    if not tiles:
        raise UserError("no training tiles")
    first = 1 + (resume["step"] if resume else 0)
    rng = np.random.default_rng([settings.seed, rank] + ([first] if resume else []))
    parameters = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(net, settings), weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    sums: dict[str, float] = {}
    since, started = 0, time.perf_counter()
    for step in range(first, settings.steps + 1):
        chosen = rng.integers(len(tiles), size=settings.batch_size)
        batch = make_batch([tiles[i] for i in chosen], rng, masks_per_image=settings.masks_per_image,
                           box_jitter=settings.box_jitter)
        terms = objective(batch)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if settings.clip:
            torch.nn.utils.clip_grad_norm_(parameters, settings.clip)
        optimizer.step()
        scheduler.step()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        since += 1
        if step % settings.log_every == 0 or step == settings.steps:
            means = {key: value / since for key, value in sums.items()}
            means["seconds_per_step"] = (time.perf_counter() - started) / since
            means["lr"] = scheduler.get_last_lr()[-1]
            report(step, means, step == settings.steps)
            sums, since, started = {}, 0, time.perf_counter()
        if keep_state and settings.checkpoint_every and step % settings.checkpoint_every == 0:
            keep_state({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})


def resolve_device(device: str) -> torch.device:
    return torch.device(device_name(device))
