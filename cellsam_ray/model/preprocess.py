"""Image preparation for CellSAM, reproducing the published v1.2 code bit for bit on the CPU.

A tile goes through three steps before the network sees it:

1. ``format_image_shape`` puts it in CellSAM's 3-channel layout (blank, nuclear, whole-cell);
2. optionally ``normalize_image``, the library normalisation (``segment_cellular_image(normalize=True)``,
   NumPy and scikit-image's CLAHE on the CPU; the whole-slide pipeline normalises slide-wide instead);
3. ``resize_to_model`` stretches it to 1024×1024, and from that one tensor two different inputs are made:
   ``embedding_input`` for SAM's image encoder and ``detector_input`` for CellFinder. The published code
   really does prepare the two branches differently (a float path and an 8-bit path); both are kept
   because the weights were trained on them.

The functions work on a batch (B, 3, S, S) where the published code works on one image, treating each
image of the batch on its own, so a batched caller gets exactly the per-tile numbers. Steps 3 on are
tensor ops that run on the model's device without a host sync; on the CPU they are the published
NumPy/scikit-image numbers bit for bit (``tests/test_preprocess.py``). On a GPU the antialiased resize is
CUDA's own kernel, whose last bits may differ (``python -m cellsam_ray.bench.gpu_check`` measures how much).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.exposure import equalize_adapthist, rescale_intensity

from cellsam_ray.model.sam import PIXEL_MEAN as SAM_PIXEL_MEAN
from cellsam_ray.model.sam import PIXEL_STD as SAM_PIXEL_STD

MODEL_SIZE = 1024
"""Side of the square both networks see; every tile is stretched (not letterboxed) to it."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_MAX_EPS = 1e-6
"""kornia ``normalize_min_max``'s default, used by the published ``Standardize``."""


def format_image_shape(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as float64 (H, W, 3) with its channels right-aligned: (blank, nuclear, whole-cell).

    A grayscale (H, W) image becomes the whole-cell channel, two channels become nuclear and whole-cell.
    The channel axis must be last. (The published function instead takes the smallest axis as the
    channel axis, which silently transposes a channels-last image narrower than 4 px; for every other
    channels-last image the two agree.)
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or not 1 <= image.shape[2] <= 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image with C <= 3, got shape {image.shape}")
    height, width, channels = image.shape
    out = np.zeros((height, width, 3), dtype=np.float64)
    out[:, :, 3 - channels :] = image
    return out


def normalize_image(image: np.ndarray, *, percentile: float = 99.9, kernel_size: int = 128) -> np.ndarray:
    """The library normalisation of a formatted (H, W, 3) image, per channel.

    Each channel is clipped at the ``percentile`` of its non-zero pixels (to tame hot pixels), then a
    channel that is now constant is set to 0 and any other is rescaled to [0, 1] and equalised with
    CLAHE (``kernel_size``, skimage's default clip limit). Returns float64 (H, W, 3).
    """
    out = np.zeros_like(image, dtype=np.float64)
    for channel in range(image.shape[2]):
        values = image[:, :, channel]
        nonzero = values[values != 0]
        if nonzero.size == 0:
            continue  # a blank channel stays blank
        clipped = np.minimum(values, np.percentile(nonzero, percentile))
        if np.all(clipped == clipped.flat[0]):
            continue
        unit = rescale_intensity(clipped, out_range=(0.0, 1.0))
        out[:, :, channel] = equalize_adapthist(unit, kernel_size=kernel_size)
    return out


def model_tensor(image: np.ndarray, *, normalize: bool = False) -> torch.Tensor:
    """A tile as the float32 (3, H, W) CPU tensor ``resize_to_model`` starts from.

    Formatted (``format_image_shape``) and, with ``normalize``, library-normalised. A float32 tile
    without normalisation skips the float64 detour (its values are the same; a 1024² tile saves ~25 MB
    of copies), which is the whole-slide pipeline's case.
    """
    if normalize or image.dtype != np.float32:
        formatted = format_image_shape(image)
        if normalize:
            formatted = normalize_image(formatted)
        return torch.from_numpy(np.ascontiguousarray(formatted.transpose(2, 0, 1))).float()
    planes = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0) if image.ndim == 3 else image
    if planes.ndim != 3 or not 1 <= len(planes) <= 3:
        format_image_shape(image)  # raises the shape error
    out = torch.zeros((3, *planes.shape[1:]), dtype=torch.float32)
    out[3 - len(planes) :] = torch.from_numpy(np.ascontiguousarray(planes))
    return out


def resize_to_model(image: np.ndarray | torch.Tensor, size: int = MODEL_SIZE) -> torch.Tensor:
    """Stretch a formatted (H, W, 3) image, or (B, 3, H, W) tensors on any device, to float32 (B, 3, size, size).

    Bilinear with antialiasing, as torchvision's ``v2.Resize((1024, 1024))`` does on a float tensor (the
    same kernel: ``F.interpolate(..., antialias=True)``). The aspect ratio is not kept. Each image of a
    batch is resized on its own, so batching does not change the numbers.
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().unsqueeze(0)
    return F.interpolate(image.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _per_channel_min_max(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation followed by a per-(image, channel) min–max to [0, 1].

    Mathematically the first step cancels out, but the published code does both, and the order decides
    the last bits of the result (the epsilon is added on the ImageNet scale).
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    x = (x - mean) / std
    flat = x.flatten(2)
    low = flat.min(dim=2).values[:, :, None, None]
    high = flat.max(dim=2).values[:, :, None, None]
    return (x - low) / (high - low + MIN_MAX_EPS)


PERCENTILE = 99.5
"""Upper end of the SAM branch's intensity window, as a percentile of the tile's non-zero pixels."""


def embedding_input(resized: torch.Tensor, *, adv_mode: bool = True) -> torch.Tensor:
    """The SAM branch's [0, 1] tensor (the golden ``model_input_embedding``), from ``resize_to_model``.

    Per image, all three channels together are rescaled from [min, 99.5th percentile] of the non-zero
    pixels to [0, 1] (clipping above), then each channel is min–max normalised on its own. An all-zero
    image skips the percentile step, as published. A legacy (pre-v1.2, ``adv_mode=False``) model gets
    the percentile step only. Tensor ops on ``resized``'s device, without a host sync; on the CPU they
    are bit for bit the published NumPy/scikit-image arithmetic (``np.percentile`` then
    ``rescale_intensity(in_range=..., out_range="float32")``).
    """
    low, high, count = _percentile_window(resized)
    x = _rescale_to_unit(resized, low, high)
    x = torch.where((count > 0)[:, None, None, None], x, resized)  # an all-zero image stays as it is
    return _per_channel_min_max(x) if adv_mode else x


def _percentile_window(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, (0th, 99.5th) percentile of the non-zero values, float64, and how many there are.

    The percentiles follow ``np.percentile``'s default ('linear') method step for step: the virtual
    index ``(n - 1) * q``, the two order statistics around it and NumPy's ``_lerp`` in float64 on
    float32 ends. Order statistics are exact whatever finds them: NumPy's partition on the CPU (as
    ``np.percentile``), a sort on an accelerator (where a partition would need the count on the host).
    """
    flat = images.flatten(1)
    count = (flat != 0).sum(dim=1)
    q = torch.tensor([0.0, PERCENTILE / 100], dtype=torch.float64).to(images.device, non_blocking=True)
    virtual = (count[:, None] - 1).double() * q  # (B, 2)
    previous = virtual.floor()
    above = virtual >= (count[:, None] - 1).double()  # NumPy then takes the largest value twice
    gamma = virtual - torch.where(above, -1.0, previous)
    last = (count[:, None] - 1).clamp(min=0)
    first_rank = torch.where(above, last, previous.long().clamp(min=0))
    second_rank = torch.where(above, last, (previous.long() + 1).clamp(min=0))
    a, b = _nonzero_order_statistics(flat, torch.cat((first_rank, second_rank), dim=1), count).chunk(2, dim=1)
    diff = b - a  # float32, as NumPy's ``b - a``
    value = torch.where(gamma >= 0.5, b.double() - diff.double() * (1 - gamma), a.double() + diff.double() * gamma)
    return value[:, 0], value[:, 1], count


def _nonzero_order_statistics(flat: torch.Tensor, ranks: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The ``ranks``-th smallest non-zero value of each row of ``flat`` (0 where a row has none)."""
    if flat.device.type == "cpu":
        return _partitioned_order_statistics(flat, ranks, count)
    return _sorted_order_statistics(flat, ranks, count)


def _partitioned_order_statistics(flat: torch.Tensor, ranks: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """NumPy's partition of each row's non-zero values, as ``np.percentile`` does (fast on a CPU)."""
    out = torch.zeros(ranks.shape, dtype=flat.dtype)
    for i, (row, n) in enumerate(zip(flat.numpy(), count.tolist())):
        if n:
            wanted = ranks[i].tolist()
            out[i] = torch.from_numpy(np.partition(row[row != 0], sorted(set(wanted)))[wanted])
    return out


def _sorted_order_statistics(flat: torch.Tensor, ranks: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A sort of each whole row, the non-zero ranks mapped past the zeros: no host sync (an accelerator's)."""
    ordered = flat.sort(dim=1).values
    negatives = (flat < 0).sum(dim=1, keepdim=True)
    zeros = flat.shape[1] - count[:, None]
    index = torch.where(ranks < negatives, ranks, ranks + zeros).clamp(max=flat.shape[1] - 1)
    return torch.where(count[:, None] > 0, ordered.gather(1, index), 0.0)


def _rescale_to_unit(images: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """scikit-image's ``rescale_intensity(image, in_range=(low, high), out_range="float32")`` per image.

    NumPy computes in float32 with the bounds rounded to float32 (Python floats are weak scalars), and
    the width ``high - low`` taken in float64 before that rounding; the output range is [0, 1], or
    [-1, 1] for a negative ``low``.
    """
    shape = (-1, 1, 1, 1)
    low32, high32 = low.float().view(shape), high.float().view(shape)
    width32 = (high - low).float().view(shape)
    out_min = torch.where(low >= 0, 0.0, -1.0).float().view(shape)
    clipped = torch.clamp(images, low32, high32)
    scaled = ((clipped - low32) / width32).mul_(1 - out_min).add_(out_min)
    flat = torch.clamp(clipped, out_min, torch.ones_like(out_min))
    return torch.where((low == high).view(shape), flat, scaled)


def sam_pixel_normalize(unit: torch.Tensor) -> torch.Tensor:
    """SAM's pixel normalisation for a [0, 1] tensor: what the image encoder is fed."""
    mean = (torch.tensor(SAM_PIXEL_MEAN, dtype=unit.dtype).view(1, 3, 1, 1) / 255).to(unit.device, non_blocking=True)
    std = (torch.tensor(SAM_PIXEL_STD, dtype=unit.dtype).view(1, 3, 1, 1) / 255).to(unit.device, non_blocking=True)
    return (unit - mean) / std


def quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """``x * 255`` truncated toward zero and wrapped modulo 256, as ``ToPILImage`` does on the CPU.

    Values outside [0, 1] (an un-normalised input) therefore wrap around rather than saturate. The
    wrap is spelled out in integers because a float-to-uint8 cast of out-of-range values is undefined
    behaviour and differs between devices.
    """
    return torch.bitwise_and(torch.trunc(x * 255).to(torch.int64), 255).to(torch.uint8)


def detector_input(resized: torch.Tensor, *, adv_mode: bool = True) -> torch.Tensor:
    """CellFinder's input tensor (the golden ``model_input_detector``), from ``resize_to_model``.

    The stretched image is quantised to 8 bits, SAM-normalised on the 0–255 scale, then each channel is
    min–max normalised to [0, 1]; finally an empty nuclear channel is filled with the whole-cell channel
    or, failing that, an empty whole-cell channel with the nuclear one (``ToRGB``), so a one-marker
    image shows CellFinder the same signal twice. A legacy (``adv_mode=False``) model gets the
    SAM-normalised 8-bit image as it is.
    """
    pixels = quantize_uint8(resized).float()
    mean = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1).to(pixels.device, non_blocking=True)
    std = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1).to(pixels.device, non_blocking=True)
    x = (pixels - mean) / std
    if not adv_mode:
        return x
    x = _per_channel_min_max(x)
    nuclear_empty = x[:, 1].flatten(1).amax(dim=1) == 0
    nuclear = torch.where(nuclear_empty[:, None, None], x[:, 2], x[:, 1])
    cell_empty = x[:, 2].flatten(1).amax(dim=1) == 0
    cell = torch.where(cell_empty[:, None, None], nuclear, x[:, 2])
    return torch.stack((x[:, 0], nuclear, cell), dim=1)
