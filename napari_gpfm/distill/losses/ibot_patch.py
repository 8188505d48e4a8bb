"""iBOT masked-patch self-distillation loss with teacher centring.

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022), eq. (2), as used
by DINOv2 (Oquab et al. 2023, §4 "Patch-level objective"): for masked patch tokens u of the
student's masked global crop and the teacher's unmasked view of the same crop,

    L_iBOT = -1/n_images Σ_images 1/|M_i| Σ_{u ∈ M_i} Σ_k p_t,u,k log softmax(s_u / τ_s)_k

with p_t = softmax((t_u - c) / τ_t); images without a mask contribute zero. ``mask_weights``
carries 1/|M_i| per masked token. The centre c is an EMA of the mean masked teacher logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum
from .dino_cls import cross_entropy_soft


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between student and centred teacher prototypes on masked patch tokens."""

    center: torch.Tensor

    def __init__(self, n_prototypes: int, student_temp: float, center_momentum: float) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t - c) / τ_t) for masked teacher tokens (M, K)."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean masked-token teacher logit over all processes (skips empty batches)."""
        logits = teacher_logits.float()
        stats = all_reduce_sum(torch.cat([logits.sum(dim=0), logits.new_tensor([len(logits)])]))
        count = stats[-1]
        if count > 0:
            batch_center = (stats[:-1] / count).unsqueeze(0)
            momentum = self.center_momentum
            self.center.mul_(momentum).add_(batch_center, alpha=1 - momentum)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        mask_weights: torch.Tensor,
        n_images: int,
    ) -> torch.Tensor:
        """``student_logits``/``teacher_probs`` (M, K) at masked tokens; ``mask_weights`` (M,)."""
        per_token = cross_entropy_soft(teacher_probs, student_logits.float(), self.student_temp)
        return (per_token * mask_weights).sum() / n_images
