"""Projection heads: the DINO/iBOT prototype head and the per-expert projection head.

* :class:`DINOHead` (Caron et al. 2021, §3.1): MLP (GELU) → bottleneck → L2-normalise →
  weight-normalised linear layer onto K prototypes (65,536 for ViT-L); as in DINOv2 and GPFM
  each prototype's gain (``weight_g``) starts at 1 and is trained, or stays 1 (DINO v1's
  ``norm_last_layer``) with ``learn_gain=False``.
* :class:`ExpertHead` (GPFM): Linear(D → 256) → L2-normalise → weight-normalised
  Linear(256 → expert dim, no bias), applied to CLS and patch tokens alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TRUNC_NORMAL_STD = 0.02
NORM_EPS = 1e-6


class NormedLinear(nn.Module):
    """Weight-normalised linear layer without bias: W = g · V / ||V||_row (Salimans & Kingma 2016).

    With ``learn_gain=False`` g is fixed to 1 (DINO's ``norm_last_layer``), so outputs of
    normalised inputs are cosines.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_gain: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=TRUNC_NORMAL_STD)
        self.gain = nn.Parameter(torch.ones(out_dim, 1)) if learn_gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.weight, dim=1)
        if self.gain is not None:
            weight = weight * self.gain
        return F.linear(x, weight)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=TRUNC_NORMAL_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """``n_layers``-layer MLP to a bottleneck, L2-normalised, onto ``n_prototypes`` prototypes."""

    def __init__(
        self, in_dim: int, n_prototypes: int, hidden_dim: int, bottleneck_dim: int, n_layers: int,
        learn_gain: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = NormedLinear(bottleneck_dim, n_prototypes, learn_gain=learn_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=NORM_EPS))


class ExpertHead(nn.Module):
    """Student token (..., D) → expert feature space (..., expert_dim)."""

    def __init__(self, in_dim: int, expert_dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, bottleneck_dim)
        _init_linear(self.proj)
        self.last_layer = NormedLinear(bottleneck_dim, expert_dim, learn_gain=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.proj(x), dim=-1, eps=NORM_EPS))
