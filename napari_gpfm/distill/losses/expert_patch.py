"""Expert patch-token distillation loss (GPFM, Ma et al. 2024, arXiv 2407.18449).

The expert's patch grid (h_e × w_e, e.g. 14×14 for a ViT/16 at 224 px) is resized to the
student's (h_s × w_s, 16×16 for ViT/14) with bicubic interpolation, then

    L_patch = w_cos · mean_u(1 - cos(h(s_u), ẽ_u)) + w_l1 · mean_elements SmoothL1_β(h(s_u), ẽ_u)

with w_cos = 0.9, w_l1 = 0.1 in GPFM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def square_side(n_tokens: int) -> int:
    """Side of the square patch grid holding ``n_tokens`` tokens."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens do not form a square grid")
    return side


def resize_patch_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, N, D) tokens of a square grid -> (B, side², D), bicubic over the grid."""
    b, n, d = tokens.shape
    source = square_side(n)
    if source == side:
        return tokens
    grid = tokens.transpose(1, 2).reshape(b, d, source, source).float()
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class ExpertPatchLoss(nn.Module):
    """Cosine + SmoothL1 between projected student patch tokens and resized expert tokens."""

    def __init__(self, cos_weight: float, smooth_l1_weight: float, beta: float) -> None:
        super().__init__()
        self.cos_weight, self.smooth_l1_weight, self.beta = cos_weight, smooth_l1_weight, beta

    def forward(self, student: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """``student`` (B, N_s, D_e) projected tokens; ``expert`` (B, N_e, D_e) expert tokens."""
        target = resize_patch_grid(expert.float(), square_side(student.shape[1]))
        student = student.float()
        cos = F.cosine_similarity(student, target, dim=-1).mean()
        smooth_l1 = F.smooth_l1_loss(student, target, beta=self.beta)
        return self.cos_weight * (1.0 - cos) + self.smooth_l1_weight * smooth_l1
