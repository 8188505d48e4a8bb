"""Where models run and in which precision: the one place every job resolves both.

``resolve_device("auto")`` picks CUDA when present, else the CPU; asking for CUDA without it is
an error naming the fix.

Embedding precision is part of the recipe (:func:`resolve_precision`): ``"fp32"``, ``"fp16"``
or ``"bf16"``; ``"auto"`` is fp16 on CUDA (closest to fp32 at the speed of bf16: on
GPFM-architecture features fp16 deviates ≈0.3 % from fp32, bf16 ≈2.5 %) and fp32 elsewhere. The
resolved name is what a run records. fp16 and bf16 also run on the CPU, through torch's CPU
autocast (usually no faster than fp32 there; useful to reproduce a GPU store's numbers).
Half precision always runs as autocast (weights stay fp32; norms and softmax in fp32), as
TRIDENT does.

``autocast(device)`` without a precision keeps the training jobs' rule: bf16 (fp16 where bf16
is unsupported) on CUDA, plain fp32 elsewhere.
"""

from __future__ import annotations

import contextlib

import torch

from napari_gpfm.errors import NapariGpfmError

__all__ = [
    "PRECISIONS",
    "PRECISION_CHOICES",
    "PrecisionError",
    "autocast",
    "autocast_dtype",
    "device_label",
    "precision_dtype",
    "precision_name",
    "resolve_device",
    "resolve_precision",
]

#: Precisions an embedding run can compute in (what a store records).
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
#: What a user may ask for: a precision, or ``"auto"`` (fp16 on CUDA, fp32 elsewhere).
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16,
}


class PrecisionError(NapariGpfmError, ValueError):
    """A precision that is unknown or cannot run on the chosen device (the message says which
    to choose instead)."""


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


def resolve_precision(precision: str | None, device: str | torch.device | None = "auto") -> str:
    """The precision an embedding run on ``device`` computes in: ``"auto"``/``None`` → fp16 on
    CUDA, fp32 elsewhere; an explicit ``fp32``/``fp16``/``bf16`` is checked against the device
    (bf16 on a GPU without bf16 support is refused). Raises :class:`PrecisionError`."""
    dev = resolve_device(device)
    name = "auto" if precision in (None, "") else str(precision).strip().lower()
    if name not in PRECISION_CHOICES:
        raise PrecisionError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}"
        )
    if name == "auto":
        return "fp16" if dev.type == "cuda" else "fp32"
    if name == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(
            f"precision bf16 requested but {torch.cuda.get_device_name(dev)} does not support "
            "bfloat16; choose fp16 or fp32"
        )
    return name


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (``None`` for fp32: no autocast)."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise PrecisionError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        ) from None


def autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The training jobs' autocast dtype on ``device`` (``None``: fp32, no autocast)."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True,
             precision: str | None = None) -> contextlib.AbstractContextManager:  # fmt: skip
    """Mixed precision context. With ``precision`` (an embedding run): that precision, resolved
    by :func:`resolve_precision` (fp16/bf16 run as autocast on CUDA and on the CPU). Without:
    the training rule of :func:`autocast_dtype` (bf16 on CUDA, nothing elsewhere)."""
    if precision is not None:
        dtype = precision_dtype(resolve_precision(precision, device)) if enabled else None
    else:
        dtype = autocast_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(device: torch.device, enabled: bool = True,
                   precision: str | None = None) -> str:  # fmt: skip
    """"bf16", "fp16" or "fp32": what :func:`autocast` (same arguments) computes in."""
    if precision is not None:
        return resolve_precision(precision, device) if enabled else "fp32"
    dtype = autocast_dtype(device, enabled)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def device_label(device: torch.device) -> str:
    """What a store records of where it was computed: ``"cpu"``, ``"cuda (NVIDIA H200)"``."""
    if device.type == "cuda":
        try:
            return f"cuda ({torch.cuda.get_device_name(device)})"
        except Exception:  # noqa: BLE001 - a name is a courtesy; the type is what matters
            return "cuda"
    return device.type
