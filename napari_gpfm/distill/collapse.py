"""Collapse guard: how much the EMA teacher's DINO target still depends on the image.

For the teacher's centred, sharpened prototype distributions p_i of the images i of a step,

    I = H(mean_i p_i) - mean_i H(p_i)     (nats, natural log)

is the mutual information between the image and the prototype drawn from its target. It is 0
when every image gets the same target (collapse: to one prototype, or to the uniform
distribution, which is what a small student with LayerScale 1e-5 converges to, DINO then
sitting at ln K), and at most ln K. Issue #11 measured 0.47 nats at step 400 for a healthy tiny
student (LayerScale init 1.0, teacher temperature 0.04) against 0 for the collapsed one.

:class:`CollapseGuard` warns once when I stays below :data:`COLLAPSE_NATS` for
:data:`COLLAPSE_WINDOW` consecutive steps (and again after it recovered and fell back). The run
logs I as ``teacher_info`` every step (``log.csv``, TensorBoard), the command line shows it in
its progress bar, and the Finetune dock in its status line.
"""

from __future__ import annotations

import math

import torch

#: Below this, the teacher's targets carry (almost) no information about the image.
COLLAPSE_NATS = 0.01
#: Consecutive steps below :data:`COLLAPSE_NATS` before the warning.
COLLAPSE_WINDOW = 50


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Row entropies (nats) of distributions ``p`` (..., K); 0·log 0 = 0."""
    p = p.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


@torch.no_grad()
def image_dependent_information(probs: torch.Tensor) -> torch.Tensor:
    """H(mean p) - mean H(p) of the rows of ``probs`` (N, K), in nats, clamped at 0."""
    probs = probs.float()
    return (entropy(probs.mean(dim=0)) - entropy(probs).mean()).clamp_min(0.0)


def collapse_message(step: int, window: int, value: float, threshold: float) -> str:
    return (f"collapse guard: the teacher's image-dependent information has stayed below "
            f"{threshold:g} nats for {window} steps (step {step + 1}: {value:.4f} nats): the "
            "DINO targets no longer depend on the image and the DINO loss cannot teach the "
            "student anything. Small students need student.layerscale_init=1.0 with "
            "teacher.temp=0.04 (issue #11); lower the learning rate or raise "
            "teacher.warmup_temp_steps otherwise.")


class CollapseGuard:
    """Feed :meth:`update` each step's information; it returns a warning once per collapse."""

    def __init__(self, threshold: float | None = None, window: int | None = None) -> None:
        self.threshold = COLLAPSE_NATS if threshold is None else threshold
        self.window = COLLAPSE_WINDOW if window is None else window
        self.below = 0
        self.warned = False

    def update(self, step: int, value: float | None) -> str | None:
        if value is None or not math.isfinite(value):
            return None
        if value >= self.threshold:
            self.below, self.warned = 0, False
            return None
        self.below += 1
        if self.below >= self.window and not self.warned:
            self.warned = True
            return collapse_message(step, self.window, value, self.threshold)
        return None

    @property
    def collapsed(self) -> bool:
        return self.warned
