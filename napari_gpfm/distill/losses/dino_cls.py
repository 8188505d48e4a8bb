"""DINO CLS-token self-distillation loss with teacher centring.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021), eq. (1)-(2),
as used by DINOv2 (Oquab et al. 2023, §4 "Image-level objective"):

    p_t = softmax((g_t(x) - c) / τ_t),   p_s = softmax(g_s(x') / τ_s)
    L_DINO = 1/|P| Σ_{(s, t) ∈ P} mean_batch H(p_t, p_s),   H(a, b) = -Σ_k a_k log b_k

where P pairs every student crop with every teacher (global) crop except the identical view, and
the centre follows c ← m·c + (1 - m)·mean_batch g_t(x), averaged over all processes.

The sum over pairs is divided as DINOv2 does, by |P_global| + max(|P_local|, 1): the mean over
pairs when there are local crops, and with none (``crops.local_number: 0``) the two global pairs
divided by 3, not 2.
"""

from __future__ import annotations

import torch

from .centering import CenteredTeacherLoss, cross_entropy_soft


class DINOClsLoss(CenteredTeacherLoss):
    """Cross-view cross-entropy between student and centred, sharpened teacher CLS prototypes."""

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
        n_global_pairs = len(pairs)
        if student_local is not None and len(student_local):
            n_local = len(student_local) // len(teachers[0])
            pairs += [(s, t) for s in student_local.chunk(n_local) for t in teachers]
        losses = [cross_entropy_soft(t, s.float(), self.student_temp).mean() for s, t in pairs]
        # DINOv2 divides by n_global_pairs + max(n_local_pairs, 1): the mean over pairs with
        # local crops, 2/3 of it without (its n_local_crops_loss_terms is at least 1)
        return torch.stack(losses).sum() / (n_global_pairs + max(len(pairs) - n_global_pairs, 1))
