"""Numeric precision of the networks: ``fp32``, ``tf32`` or ``bf16``, chosen per run.

- ``fp32``: IEEE float32 everywhere, convolutions included (cuDNN would otherwise use TF32 for them: its
  default). The CPU default, and the only precision the golden cases are checked in bit for bit.
- ``tf32``: float32 tensors, matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs,
  float32 accumulation). The CUDA default. A CPU has no TF32, so there it is ``fp32``.
- ``bf16``: SAM's image encoder and mask decoder under bfloat16 autocast (the decoder is most of a dense
  tile's FLOPs: 3.6 GFLOP a box), with float32 islands where a few bits move answers: SAM's prompt
  encoder (box corners become Fourier features), the mask upsampling and every threshold. CellFinder
  (its ViT trunk, transformer, heads and top-k) stays float32: it decides which boxes exist, and in
  bf16 it changed them. Measured on the CPU, golden tiny model (``notes/gpu.md``): SAM's encoder or
  decoder alone in bf16 kept every golden cell (F1 1.0 against the golden labels, worst IoU 0.89);
  CellFinder's trunk in bf16 gave F1 0.70 on one case, its transformer F1 0.50.

The settings of ``torch.backends`` are process-wide, so :func:`configure` is called once, where the
model is loaded (a model actor runs one precision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def resolve(precision: str, device: str | torch.device) -> str:
    """The precision to run: ``auto`` is ``tf32`` on CUDA and ``fp32`` elsewhere; ``tf32`` off CUDA is ``fp32``."""
    kind = torch.device(device).type
    if precision == "auto":
        return "tf32" if kind == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected auto or one of {', '.join(PRECISIONS)}")
    return "fp32" if precision == "tf32" and kind != "cuda" else precision


def configure(precision: str, device: str | torch.device) -> str:
    """Resolve ``precision`` and set the process's matmul/convolution flags for it; returns the precision."""
    precision = resolve(precision, device)
    if torch.device(device).type == "cuda":
        tf32 = precision == "tf32"
        # The legacy flags on purpose: mixing them with the newer ``fp32_precision`` API is an error.
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``bf16``, nothing otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def float32_island(x: torch.Tensor) -> Iterator[None]:
    """Autocast off on ``x``'s device (a float32 island inside a bf16 region); a no-op outside one."""
    with torch.autocast(x.device.type, enabled=False):
        yield
