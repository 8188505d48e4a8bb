"""Frozen expert encoders whose CLS and patch tokens the student learns to predict.

Each entry of ``experts.models`` is either a registry model::

    uni: {encoder: uni, weights: null, cls_weight: 1.0, patch_weight: 0.25}

loaded through :func:`napari_gpfm.encoders.load_encoder` (``allow_random: true`` permits a
random network when the weights are missing, for smoke tests), or a timm architecture with random
initialisation (for tests and benchmarks)::

    tiny: {timm: {name: vit_tiny_patch16_224, kwargs: {img_size: 64}}, cls_weight: 1}

Experts receive the global crops exactly as the student does (ImageNet-normalised), resized
bicubically when their fixed input size differs from the crop size. Their token width
(``embed_dim``) sizes the student's projection head, which is applied to CLS and patch tokens,
so experts with a patch weight must produce patch tokens of the same width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config


class FrozenExpert(nn.Module):
    """A frozen encoder in eval mode: ``tokens(images) -> (cls (B, D), patch (B, N, D))``."""

    def __init__(self, model: nn.Module, embed_dim: int, input_size: int | None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.embed_dim = embed_dim
        self.input_size = input_size

    def train(self, mode: bool = True) -> FrozenExpert:
        """Experts stay in eval mode whatever the surrounding module does."""
        return super().train(False)

    def _fit(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_size is None or images.shape[-1] == self.input_size:
            return images
        size = (self.input_size, self.input_size)
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False)

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Subclasses return the model's (CLS, patch tokens) for input-sized images."""
        raise NotImplementedError

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tokens(self._fit(images))


class TimmExpert(FrozenExpert):
    """A timm ViT built from a name and kwargs, randomly initialised."""

    def __init__(self, name: str, kwargs: dict[str, Any]) -> None:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        dynamic = getattr(model, "dynamic_img_size", False)
        super().__init__(model, model.embed_dim, None if dynamic else model.patch_embed.img_size[0])

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_features(images)
        return out[:, 0], out[:, self.model.num_prefix_tokens :]


class RegistryExpert(FrozenExpert):
    """A model from the napari-gpfm encoder registry (weights from its card).

    Its targets are the trunk tokens of ``Encoder.tokens`` (width ``token_dim``).
    """

    def __init__(
        self, name: str, weights: str | None, device: torch.device, allow_random: bool, seed: int
    ) -> None:
        from napari_gpfm.encoders import load_encoder

        encoder = load_encoder(
            name, weights=weights, device=str(device), allow_random=allow_random, seed=seed
        )
        super().__init__(encoder.model, int(encoder.token_dim), int(encoder.input_size))
        self.encoder = encoder

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.tokens(images)


@dataclass(frozen=True)
class ExpertWeights:
    """Loss weights of one expert; 0 switches that term off."""

    cls: float
    patch: float


def build_experts(
    cfg: Config, device: torch.device
) -> tuple[dict[str, FrozenExpert], dict[str, ExpertWeights]]:
    """Experts with a positive CLS or patch weight, and their weights, keyed by config name."""
    experts: dict[str, FrozenExpert] = {}
    weights: dict[str, ExpertWeights] = {}
    for name, spec in cfg["experts"]["models"].items():
        w = ExpertWeights(float(spec.get("cls_weight", 0.0)), float(spec.get("patch_weight", 0.0)))
        if w.cls <= 0 and w.patch <= 0:
            continue
        if "timm" in spec:
            expert: FrozenExpert = TimmExpert(spec["timm"]["name"], spec["timm"].get("kwargs", {}))
        else:
            expert = RegistryExpert(
                spec["encoder"], spec.get("weights"), device,
                bool(spec.get("allow_random", False)), int(cfg["train"]["seed"]),
            )
        experts[name], weights[name] = expert.to(device), w
    return experts, weights
