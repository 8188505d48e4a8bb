"""Per-iteration schedules (arrays indexed by optimiser step), so a resumed run is exact.

* lr: linear warm-up from 0, then cosine to ``optim.min_lr``;
* weight decay: cosine from ``optim.weight_decay`` to ``optim.weight_decay_end``;
* EMA momentum: cosine from ``teacher.momentum_start`` to ``teacher.momentum_end``;
* teacher temperature: linear warm-up, then constant (DINO);
* last-layer lr factor: 0 while the prototype layers are frozen, then 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import Config


def cosine_schedule(
    start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """``total_steps`` values: linear ``warmup_start → start`` over ``warmup_steps`` (exclusive of
    ``start``), then half a cosine from ``start`` to ``end``."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n - 1, 1)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(math.pi * t))
    return np.concatenate([warmup, cosine])


def warmup_constant_schedule(
    start: float, end: float, total_steps: int, warmup_steps: int
) -> np.ndarray:
    """Linear ``start → end`` over ``warmup_steps``, then ``end``."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(start, end, warmup_steps, endpoint=False)
    return np.concatenate([warmup, np.full(total_steps - warmup_steps, end)])


@dataclass(frozen=True)
class Schedules:
    """All per-step values; ``at(step)`` reads one row."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr_factor: np.ndarray

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": float(self.lr[step]),
            "weight_decay": float(self.weight_decay[step]),
            "momentum": float(self.momentum[step]),
            "teacher_temp": float(self.teacher_temp[step]),
            "last_layer_lr_factor": float(self.last_layer_lr_factor[step]),
        }


def build_schedules(cfg: Config, peak_lr: float, freeze_last_layer_steps: int) -> Schedules:
    """Schedules for ``train.steps`` steps at the (already batch-scaled) ``peak_lr``."""
    steps, optim, teacher = cfg["train"]["steps"], cfg["optim"], cfg["teacher"]
    factor = np.ones(steps)
    factor[: min(freeze_last_layer_steps, steps)] = 0.0
    return Schedules(
        lr=cosine_schedule(peak_lr, optim["min_lr"], steps, cfg["schedules"]["warmup_steps"]),
        weight_decay=cosine_schedule(optim["weight_decay"], optim["weight_decay_end"], steps),
        momentum=cosine_schedule(teacher["momentum_start"], teacher["momentum_end"], steps),
        teacher_temp=warmup_constant_schedule(
            teacher["warmup_temp"], teacher["temp"], steps, teacher["warmup_temp_steps"]
        ),
        last_layer_lr_factor=factor,
    )
