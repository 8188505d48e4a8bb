"""Student/teacher backbone: a timm ViT with an iBOT mask token.

Masked patch embeddings are replaced by a learned mask token *before* the position embedding
and the transformer blocks, as in iBOT/DINOv2. The wrapped timm model keeps timm's flat key
names, so ``backbone.vit.state_dict()`` loads into ``timm.create_model(arch, **export_kwargs)``.

Drop path follows DINOv2/GPFM by default (``student.drop_path_uniform``): the same rate on every
block, where timm would ramp it linearly from 0. With ``grad_checkpointing`` the blocks'
activations are recomputed in the backward pass (non-reentrant checkpointing, which restores the
RNG state, so drop path draws the same masks and the gradients equal an ordinary pass).
``freeze_all_but_last(backbone, n)`` leaves only the last ``n`` blocks and the final norm
trainable (the embeddings and the iBOT mask token included in the frozen part, so no activation
of a frozen block is kept for the backward pass).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import Config, student_timm_kwargs


class MaskedViT(nn.Module):
    """``forward(images, masks=None) -> (cls (B, D), patch (B, N, D))``, after the final norm."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        if getattr(vit, "cls_token", None) is None or not getattr(vit, "dynamic_img_size", False):
            raise ValueError("the backbone must be a timm ViT with a CLS token, dynamic_img_size")
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        self.grad_checkpointing = False

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return self.vit.blocks(x)
        for block in self.vit.blocks:
            x = checkpoint(block, x, use_reentrant=False) if _trains(block) else block(x)
        return x

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vit = self.vit
        x = vit.patch_embed(images)  # (B, H, W, D) with dynamic_img_size
        if masks is not None:
            token = self.mask_token.to(x.dtype)
            x = torch.where(masks.view(*x.shape[:3], 1), token, x)
        x = vit._pos_embed(x)  # timm: prepend CLS, add (resampled) position embedding
        x = vit.norm_pre(vit.patch_drop(x))
        x = vit.norm(self._blocks(x))
        return x[:, 0], x[:, vit.num_prefix_tokens :]


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def export_kwargs(cfg: Config) -> dict[str, Any]:
    """timm kwargs that rebuild the backbone for inference at the global crop size."""
    return student_timm_kwargs(cfg)


def drop_path_rates(vit: nn.Module) -> list[float]:
    """Each block's drop-path probability (residual branch 1; branch 2 is the same)."""
    return [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in vit.blocks]


def build_backbone(cfg: Config, drop_path_rate: float) -> MaskedViT:
    """The configured timm ViT (random init), accepting any crop size."""
    vit = timm.create_model(
        cfg["student"]["arch"],
        pretrained=False,
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        **export_kwargs(cfg),
    )
    if cfg["student"]["drop_path_uniform"] and drop_path_rate > 0:
        for block in vit.blocks:
            block.drop_path1 = DropPath(drop_path_rate)
            block.drop_path2 = DropPath(drop_path_rate)
    return MaskedViT(vit)


def freeze_all_but_last(backbone: MaskedViT, n_blocks: int | None) -> int:
    """Freeze everything but the last ``n_blocks`` blocks and the final norm (``None``: freeze
    nothing); returns the number of frozen parameters."""
    if n_blocks is None:
        return 0
    vit = backbone.vit
    keep = {id(p) for b in list(vit.blocks)[-n_blocks:] for p in b.parameters()}
    keep |= {id(p) for p in vit.norm.parameters()}
    frozen = 0
    for param in backbone.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
