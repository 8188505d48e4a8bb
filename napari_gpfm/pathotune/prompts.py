"""Visual prompts of PathoTune (Lu et al., MICCAI 2024, arXiv 2403.16497).

* :class:`TaskVisualPrompts` (TVP): ``N`` learnable tokens of the model width ``C`` for every
  transformer block ("deep" prompts, VPT-deep style): block ``i`` sees its own set, and the
  previous block's outputs at those positions are dropped. Shared by every image of the task;
  they close the Foundation-Task Gap.
* :class:`VisualRefineModule` (IVP): ``M`` instance tokens computed from the image's own early
  patch tokens, so every image gets its own prompts (the Task-Instance Gap). The paper names the
  module but leaves its inside open; here ``M`` learned queries cross-attend over the
  layer-normalised patch tokens in a rank-``r`` space (keys, values and queries are
  ``r``-dimensional, ``r ≪ C``) and a linear map lifts the result back to width ``C``. That
  costs about ``3·C·r`` parameters (≈ 200 k for ViT-L at ``r = 64``), a fraction of one block.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TaskVisualPrompts", "VisualRefineModule"]


class TaskVisualPrompts(nn.Module):
    """Deep task prompts: a ``(depth, n_tokens, dim)`` parameter, one token set per block.

    Initialised like VPT: uniform in ``±sqrt(6 / (3·p² + dim))`` for patch side ``p`` (the
    Xavier bound of a patch-embedding-sized layer), so prompts start at the scale of patch
    embeddings.
    """

    def __init__(self, depth: int, n_tokens: int, dim: int, patch_size: int = 16) -> None:
        super().__init__()
        if depth < 1 or n_tokens < 1 or dim < 1:
            raise ValueError(
                f"TVP needs depth, n_tokens and dim >= 1, got {depth}, {n_tokens}, {dim}"
            )
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
        self.prompts = nn.Parameter(torch.empty(depth, n_tokens, dim).uniform_(-bound, bound))

    @property
    def n_tokens(self) -> int:
        return int(self.prompts.shape[1])

    @property
    def depth(self) -> int:
        return int(self.prompts.shape[0])

    def forward(self, block: int, batch: int) -> torch.Tensor:
        """Block ``block``'s prompts expanded to ``(batch, n_tokens, dim)``."""
        return self.prompts[block].unsqueeze(0).expand(batch, -1, -1)


class VisualRefineModule(nn.Module):
    """Instance prompts from patch tokens: ``(B, L, dim) -> (B, n_tokens, dim)``.

    ``n_tokens`` learned queries attend (one head, scaled dot product) over the patch tokens
    projected to ``rank`` dimensions; the pooled values are lifted to ``dim`` and layer-normed
    with a learnable gain, so the tokens enter the backbone at a controlled scale whatever the
    statistics of the block they come from.
    """

    def __init__(self, dim: int, n_tokens: int = 4, rank: int = 64) -> None:
        super().__init__()
        if n_tokens < 1 or rank < 1:
            raise ValueError(f"IVP needs n_tokens and rank >= 1, got {n_tokens}, {rank}")
        rank = min(rank, dim)
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(n_tokens, rank) * rank**-0.5)
        self.key = nn.Linear(dim, rank, bias=False)  # a key bias cannot change a softmax
        self.value = nn.Linear(dim, rank)
        self.out = nn.Linear(rank, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.scale = rank**-0.5

    @property
    def n_tokens(self) -> int:
        return int(self.queries.shape[0])

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, dim)`` patch tokens -> ``(B, n_tokens, dim)`` instance prompts."""
        x = self.norm(patch_tokens)
        k, v = self.key(x), self.value(x)  # (B, L, r)
        attn = torch.einsum("mr,blr->bml", self.queries, k).mul(self.scale).softmax(dim=-1)
        pooled = torch.einsum("bml,blr->bmr", attn, v)
        return self.out_norm(self.out(pooled))
