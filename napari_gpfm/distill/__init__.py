"""GPFM unified knowledge distillation: train a ViT student from its EMA teacher (DINOv2
self-distillation) and from frozen pathology experts at once. Never imports napari or Qt.

Headless API::

    from napari_gpfm.distill import load_config, run_distillation
    cfg = load_config("tiny_cpu", ["data.tiles=[/path/to/tiles]", "train.steps=100"])
    result = run_distillation(cfg, stop_event=event, on_log=print)

``iter_distillation`` is the same loop as a generator (one record per step), for GUI workers.
Heavy modules (torch, timm) load on first attribute access.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load_config": "config",
    "ConfigError": "config",
    "run_distillation": "train",
    "iter_distillation": "train",
    "StepRecord": "train",
    "DistillResult": "train",
    "NonFiniteLossError": "train",
    "DistillMetaArch": "meta_arch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
