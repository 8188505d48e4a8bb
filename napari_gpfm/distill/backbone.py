"""Student/teacher backbone: a timm ViT with an iBOT mask token.

Masked patch embeddings are replaced by a learned mask token *before* the position embedding
and the transformer blocks, as in iBOT/DINOv2. The wrapped timm model keeps timm's flat key
names, so ``backbone.vit.state_dict()`` loads into ``timm.create_model(arch, **export_kwargs)``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from .config import Config


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
        x = vit.norm(vit.blocks(x))
        return x[:, 0], x[:, vit.num_prefix_tokens :]


def export_kwargs(cfg: Config) -> dict[str, Any]:
    """timm kwargs that rebuild the backbone for inference at the global crop size."""
    return {**cfg["student"]["kwargs"], "img_size": cfg["crops"]["global_size"], "num_classes": 0}


def build_backbone(cfg: Config, drop_path_rate: float) -> MaskedViT:
    """The configured timm ViT (random init), accepting any crop size."""
    vit = timm.create_model(
        cfg["student"]["arch"],
        pretrained=False,
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        **export_kwargs(cfg),
    )
    return MaskedViT(vit)
