"""Encoders: model cards (``models/*.yaml``), safe checkpoint loading, encoder construction.

Cards and the registry import neither torch nor timm; the names that need them (`Encoder`,
`load_encoder`, checkpoint and download helpers) are imported on first use, so listing models
stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .card import ModelCard, WeightsStatus
from .errors import (
    CheckpointError,
    EncoderError,
    ModelCardError,
    StateDictMismatchError,
    UnknownModelError,
    UnsafeCheckpointError,
    WeightsDownloadError,
    WeightsNotFoundError,
)
from .registry import (
    bundled_models_dir,
    default_model_name,
    get_card,
    list_cards,
    user_models_dir,
)

if TYPE_CHECKING:
    from .checkpoint import convert_checkpoint, load_checkpoint, sha256_file
    from .device import (
        PRECISION_CHOICES,
        PRECISIONS,
        PrecisionError,
        autocast,
        precision_name,
        resolve_device,
        resolve_precision,
    )
    from .download import download_weights
    from .encoder import Encoder, build_model, load_encoder

_LAZY = {
    "Encoder": "encoder",
    "build_model": "encoder",
    "load_encoder": "encoder",
    "convert_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "sha256_file": "checkpoint",
    "download_weights": "download",
    "PRECISIONS": "device",
    "PRECISION_CHOICES": "device",
    "PrecisionError": "device",
    "autocast": "device",
    "precision_name": "device",
    "resolve_device": "device",
    "resolve_precision": "device",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRECISIONS",
    "PRECISION_CHOICES",
    "CheckpointError",
    "Encoder",
    "EncoderError",
    "ModelCard",
    "ModelCardError",
    "PrecisionError",
    "StateDictMismatchError",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "WeightsDownloadError",
    "WeightsNotFoundError",
    "WeightsStatus",
    "autocast",
    "build_model",
    "bundled_models_dir",
    "convert_checkpoint",
    "default_model_name",
    "download_weights",
    "get_card",
    "list_cards",
    "load_checkpoint",
    "load_encoder",
    "precision_name",
    "resolve_device",
    "resolve_precision",
    "sha256_file",
    "user_models_dir",
]
