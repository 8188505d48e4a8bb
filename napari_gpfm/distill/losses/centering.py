"""Teacher centring shared by the DINO and iBOT losses (Caron et al. 2021, eq. (2)).

The teacher's logits are centred and sharpened, p_t = softmax((t − c) / τ_t), and the centre
follows c ← m·c + (1 − m)·mean(t), the mean taken over every row of every process. Rows may be
CLS tokens (DINO) or masked patch tokens (iBOT, where a batch can hold none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum


def cross_entropy_soft(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, temp: float
) -> torch.Tensor:
    """Per-row H(p_t, softmax(s / τ_s)) = -Σ_k p_t,k log softmax(s / τ_s)_k."""
    return -(teacher_probs * F.log_softmax(student_logits / temp, dim=-1)).sum(dim=-1)


class CenteredTeacherLoss(nn.Module):
    """Base for losses against a centred teacher: owns the ``center`` buffer and its EMA."""

    center: torch.Tensor

    def __init__(self, n_prototypes: int, student_temp: float, center_momentum: float) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t − c) / τ_t), computed before :meth:`update_center` sees this batch."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher logit over all processes; a batch with no rows is skipped."""
        logits = teacher_logits.float()
        stats = all_reduce_sum(torch.cat([logits.sum(dim=0), logits.new_tensor([len(logits)])]))
        count = stats[-1]
        if count > 0:
            batch_center = (stats[:-1] / count).unsqueeze(0)
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
