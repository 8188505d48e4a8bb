"""Attentional pooling head on a timm ViT trunk: the image embedding of CONCH's vision tower.

CONCH (a CoCa model) pools the trunk's normalised token sequence with one learned query
(cross-attention), applies a LayerNorm and a square projection into the 512-d image-text space.
Parameter names match CONCH's checkpoint (without the ``visual.`` prefix), so its weights load
strictly after `napari_gpfm.encoders.checkpoint.convert_conch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries (width ``dim``) attend over tokens of width
    ``context_dim``."""

    def __init__(self, dim: int, context_dim: int, heads: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.attn = nn.MultiheadAttention(
            dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, context_dim) -> (B, n_queries, dim)."""
        context = self.ln_k(tokens)
        queries = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(queries, context, context, need_weights=False)[0]


class PooledViT(nn.Module):
    """A timm ViT ``trunk`` whose embedding is its attentionally pooled, projected tokens.

    Exposes timm's ``forward_features`` / ``forward_head`` / ``num_prefix_tokens`` so callers
    treat it like any timm ViT; ``forward_features`` gives the trunk's tokens (trunk width) and
    ``forward_head`` the ``dim``-wide pooled embedding (L2-normalised when ``normalize``).
    """

    def __init__(self, trunk: nn.Module, dim: int, heads: int = 8, project: bool = True,
                 normalize: bool = False):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(dim, trunk.embed_dim, heads)
        self.ln_contrast = nn.LayerNorm(dim)
        self.proj_contrast = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.project = project
        self.normalize = normalize
        self.num_prefix_tokens: int = trunk.num_prefix_tokens
        self.embed_dim: int = trunk.embed_dim
        self.num_features: int = dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the trunk's normalised tokens (B, prefix + N, trunk width)."""
        return self.trunk.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled embedding (B, dim). ``pre_logits`` exists for timm's interface: this
        head has no classifier, so the result is the same either way."""
        pooled = self.ln_contrast(self.attn_pool_contrast(x)[:, 0])
        if self.project:
            pooled = pooled @ self.proj_contrast
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
