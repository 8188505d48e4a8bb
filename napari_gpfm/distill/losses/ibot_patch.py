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

from .centering import CenteredTeacherLoss, cross_entropy_soft


class IBOTPatchLoss(CenteredTeacherLoss):
    """Cross-entropy between student and centred teacher prototypes on masked patch tokens."""

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
