"""KoLeo regulariser: Kozachenko-Leonenko differential-entropy estimator.

Sablayrolles, Douze, Schmid, Jégou, "Spreading vectors for similarity search" (ICLR 2019,
arXiv 2018), eq. (5), used by DINOv2 (Oquab et al. 2023, §4): for L2-normalised features x_i,

    L_KoLeo = -1/n Σ_i log(ρ_{n,i} + ε),   ρ_{n,i} = min_{j ≠ i} ||x_i - x_j + ε||

which pushes the nearest neighbours in a batch apart (uniform spreading of features). The ε
inside the norm is DINOv2's (``nn.PairwiseDistance(2, eps=1e-8)`` adds it to the difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


class KoLeoLoss(nn.Module):
    """Mean negative log distance of each feature to its nearest neighbour in the batch."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features.float(), dim=-1, eps=EPS)
        with torch.no_grad():
            similarity = x @ x.T
            similarity.fill_diagonal_(-float("inf"))
            nearest = similarity.argmax(dim=1)
        distance = torch.linalg.vector_norm(x - x[nearest] + EPS, dim=-1)
        return -torch.log(distance + EPS).mean()
