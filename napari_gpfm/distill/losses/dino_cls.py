"""DINO CLS-token self-distillation loss with teacher centring.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021), eq. (1)-(2),
as used by DINOv2 (Oquab et al. 2023, §4 "Image-level objective"):

    p_t = softmax((g_t(x) - c) / τ_t),   p_s = softmax(g_s(x') / τ_s)
    L_DINO = 1/|P| Σ_{(s, t) ∈ P} mean_batch H(p_t, p_s),   H(a, b) = -Σ_k a_k log b_k

where P pairs every student crop with every teacher (global) crop except the identical view, and
the centre follows c ← m·c + (1 - m)·mean_batch g_t(x), averaged over all processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum, world_size


def cross_entropy_soft(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, temp: float
) -> torch.Tensor:
    """Per-row H(p_t, softmax(s / τ_s)) = -Σ_k p_t,k log softmax(s / τ_s)_k."""
    return -(teacher_probs * F.log_softmax(student_logits / temp, dim=-1)).sum(dim=-1)


class DINOClsLoss(nn.Module):
    """Cross-view cross-entropy between student and centred, sharpened teacher CLS prototypes."""

    center: torch.Tensor

    def __init__(self, n_prototypes: int, student_temp: float, center_momentum: float) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t - c) / τ_t), computed before :meth:`update_center` sees this batch."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the batch mean of the teacher logits over all processes."""
        total = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        batch_center = total / (len(teacher_logits) * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def forward(
        self,
        student_global: torch.Tensor,
        student_local: torch.Tensor | None,
        teacher_probs: torch.Tensor,
        n_global: int,
    ) -> torch.Tensor:
        """Mean over crop pairs of the batch-mean cross-entropy.

        ``student_global`` (V·B, K) and ``teacher_probs`` (V·B, K) hold the V global views in
        blocks of B; global view i is paired with teacher views j ≠ i. ``student_local``
        (L·B, K) is paired with every teacher view.
        """
        teachers = teacher_probs.chunk(n_global)
        pairs = [
            (s, t)
            for i, s in enumerate(student_global.chunk(n_global))
            for j, t in enumerate(teachers)
            if i != j
        ]
        if student_local is not None and len(student_local):
            n_local = len(student_local) // len(teachers[0])
            pairs += [(s, t) for s in student_local.chunk(n_local) for t in teachers]
        losses = [cross_entropy_soft(t, s.float(), self.student_temp).mean() for s, t in pairs]
        return torch.stack(losses).mean()
