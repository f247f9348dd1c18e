"""Image preparation for CellSAM, reproducing the published v1.2 code bit for bit on the CPU.

A tile goes through three steps before the network sees it:

1. ``format_image_shape`` puts it in CellSAM's 3-channel layout (blank, nuclear, whole-cell);
2. optionally ``normalize_image``, the library normalisation (``segment_cellular_image(normalize=True)``);
3. ``resize_to_model`` stretches it to 1024×1024, and from that one tensor two different inputs are made:
   ``embedding_input`` for SAM's image encoder and ``detector_input`` for CellFinder. The published code
   really does prepare the two branches differently (a float path and an 8-bit path); both are kept
   because the weights were trained on them.

The functions work on a batch (B, 3, S, S) where the published code works on one image, treating each
image of the batch on its own, so a batched caller gets exactly the per-tile numbers.
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


def resize_to_model(image: np.ndarray, size: int = MODEL_SIZE) -> torch.Tensor:
    """Stretch a formatted (H, W, 3) image to a float32 (1, 3, size, size) tensor.

    Bilinear with antialiasing, as torchvision's ``v2.Resize((1024, 1024))`` does on a float tensor (the
    same kernel: ``F.interpolate(..., antialias=True)``). The aspect ratio is not kept.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().unsqueeze(0)
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _per_channel_min_max(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation followed by a per-(image, channel) min–max to [0, 1].

    Mathematically the first step cancels out, but the published code does both, and the order decides
    the last bits of the result (the epsilon is added on the ImageNet scale).
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    flat = x.flatten(2)
    low = flat.min(dim=2).values[:, :, None, None]
    high = flat.max(dim=2).values[:, :, None, None]
    return (x - low) / (high - low + MIN_MAX_EPS)


def embedding_input(resized: torch.Tensor, *, adv_mode: bool = True) -> torch.Tensor:
    """The SAM branch's [0, 1] tensor (the golden ``model_input_embedding``), from ``resize_to_model``.

    Per image, all three channels together are rescaled from [min, 99.5th percentile] of the non-zero
    pixels to [0, 1] (clipping above), then each channel is min–max normalised on its own. An all-zero
    image skips the percentile step, as published. A legacy (pre-v1.2, ``adv_mode=False``) model gets
    the percentile step only. Runs on the CPU (NumPy percentiles) and returns a float32 CPU tensor.
    """
    images = []
    for image in resized.detach().cpu().numpy():
        nonzero = image[image != 0]
        if nonzero.size:
            low, high = np.percentile(nonzero, [0.0, 99.5])
            image = rescale_intensity(image, in_range=(low, high), out_range="float32")
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32)))
    stacked = torch.stack(images)
    return _per_channel_min_max(stacked) if adv_mode else stacked


def sam_pixel_normalize(unit: torch.Tensor) -> torch.Tensor:
    """SAM's pixel normalisation for a [0, 1] tensor: what the image encoder is fed."""
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=unit.dtype, device=unit.device).view(1, 3, 1, 1) / 255
    std = torch.tensor(SAM_PIXEL_STD, dtype=unit.dtype, device=unit.device).view(1, 3, 1, 1) / 255
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
    mean = torch.tensor(SAM_PIXEL_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=pixels.device).view(1, 3, 1, 1)
    x = (pixels - mean) / std
    if not adv_mode:
        return x
    x = _per_channel_min_max(x)
    for image in x:
        if image[1].max() == 0:
            image[1] = image[2]
        if image[2].max() == 0:
            image[2] = image[1]
    return x
