"""Where models run and in which precision: the one place every job resolves both.

``resolve_device("auto")`` picks CUDA when present, else the CPU; asking for CUDA without it is
an error naming the fix. ``autocast(device)`` is the mixed-precision context inference and
training use: bf16 (fp16 where bf16 is unsupported) on CUDA, plain fp32 elsewhere.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "autocast_dtype", "precision_name", "resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` → CUDA if available, else CPU; CUDA without CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} requested but CUDA is not available on this machine; "
            "choose 'cpu' (or 'auto')"
        )
    return dev


def autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype on ``device`` (``None``: fp32, no autocast)."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (see :func:`autocast_dtype`), a no-op elsewhere."""
    dtype = autocast_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(device: torch.device, enabled: bool = True) -> str:
    """"bf16", "fp16" or "fp32": what :func:`autocast` computes in on ``device``."""
    dtype = autocast_dtype(device, enabled)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
