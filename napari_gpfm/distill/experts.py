"""Frozen expert encoders whose CLS and patch tokens the student learns to predict.

Each entry of ``experts.models`` is either a registry model::

    uni: {encoder: uni, weights: null, cls_weight: 1.0, patch_weight: 0.25}

loaded through :func:`napari_gpfm.encoders.load_encoder`, or a timm architecture with random
initialisation (for tests and benchmarks)::

    tiny: {timm: {name: vit_tiny_patch16_224, kwargs: {img_size: 64}}, cls_weight: 1}

A registry expert whose weights are not on this machine stops the run before anything is built
(:func:`resolve_experts` raises ``WeightsNotFoundError`` naming the expert and how to get the
weights), unless its entry says ``optional: true`` (the run goes on without it and says so) or
``allow_random: true`` (a seeded random network, for smoke tests). An expert whose
``cls_weight`` and ``patch_weight`` are both 0 is switched off, and the run says so too.

Experts receive the global crops exactly as the student does (ImageNet-normalised), as GPFM
feeds UNI, Phikon and CONCH its 224 px crops: at the crop size when the model accepts any size
(``dynamic_img_size``), else resized bicubically to its fixed input size; ``input_size: N``
resizes to N px instead. The CLS target (``cls_target``) is by default the model's embedding
(``forward_head``): the CLS token after the final norm for UNI and Phikon, and for CONCH the
512-d L2-normalised attention-pooled token (GPFM's ``CONCH.forward``), so its head is 512 wide;
``cls_target: cls_token`` takes the trunk's CLS token instead. The target's width (``cls_dim``)
sizes the student's projection head, which is applied to CLS and patch tokens, so an expert with
a patch weight must give patch tokens of the same width (``embed_dim``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config


def accepts_any_size(model: nn.Module) -> bool:
    """True for a timm ViT (or a pooled one) built with ``dynamic_img_size``."""
    return bool(getattr(getattr(model, "trunk", model), "dynamic_img_size", False))


class FrozenExpert(nn.Module):
    """A frozen encoder in eval mode: ``tokens(images) -> (cls (B, D), patch (B, N, D))``."""

    def __init__(self, model: nn.Module, embed_dim: int, input_size: int | None,
                 cls_dim: int | None = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.embed_dim = embed_dim
        self.cls_dim = embed_dim if cls_dim is None else cls_dim
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

    def __init__(self, name: str, kwargs: dict[str, Any], cls_target: str = "embedding",
                 input_size: int | None = None) -> None:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        if input_size is None and not accepts_any_size(model):
            input_size = model.patch_embed.img_size[0]
        super().__init__(model, model.embed_dim, input_size, model.num_features)
        self.cls_target = cls_target

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_features(images)
        patch = out[:, self.model.num_prefix_tokens :]
        if self.cls_target == "embedding":
            return self.model.forward_head(out, pre_logits=True), patch
        return out[:, 0], patch


class RegistryExpert(FrozenExpert):
    """A model from the napari-gpfm encoder registry (weights from its card).

    CLS target: the model's embedding (``cls_target="embedding"``, width ``Encoder.embed_dim``)
    or the trunk's CLS token (``"cls_token"``); patch targets: the trunk's patch tokens (width
    ``Encoder.token_dim``). ``input_size``: None for the crops' own size when the model accepts
    any size (else the card's input size), or a size in pixels.
    """

    def __init__(
        self, name: str, weights: str | None, device: torch.device, allow_random: bool, seed: int,
        cls_target: str = "embedding", input_size: int | None = None,
    ) -> None:
        from napari_gpfm.encoders import load_encoder

        encoder = load_encoder(
            name, weights=weights, device=str(device), allow_random=allow_random, seed=seed
        )
        if input_size is None and not accepts_any_size(encoder.model):
            input_size = int(encoder.input_size)
        cls_dim = int(encoder.embed_dim if cls_target == "embedding" else encoder.token_dim)
        super().__init__(encoder.model, int(encoder.token_dim), input_size, cls_dim)
        self.encoder = encoder
        self.cls_target = cls_target

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.encoder.model
        feats = model.forward_features(images.to(self.encoder.device))
        patch = feats[:, model.num_prefix_tokens:]
        if self.cls_target == "embedding":
            return model.forward_head(feats, pre_logits=True), patch
        return feats[:, 0], patch


@dataclass(frozen=True)
class ExpertWeights:
    """Loss weights of one expert; 0 switches that term off."""

    cls: float
    patch: float


def _loss_weights(spec: dict[str, Any]) -> ExpertWeights:
    return ExpertWeights(float(spec.get("cls_weight", 0.0)), float(spec.get("patch_weight", 0.0)))


def _missing_weights(name: str, spec: dict[str, Any]) -> str | None:
    """Why registry expert ``name`` cannot load its weights, and how to fix it; None if it can."""
    from napari_gpfm.encoders import get_card

    key = f"experts.models.{name}"
    card = get_card(spec["encoder"])
    if spec.get("weights"):
        path = Path(spec["weights"]).expanduser()
        if path.is_file():
            return None
        return (f"expert '{name}': its weights file {path} ({key}.weights) does not exist. Give "
                f"the path of the {card.display_name} weights, or set {key}.optional=true to "
                "train without this expert.")
    if card.resolve_weights(None) is not None or spec.get("allow_random", False):
        return None
    return (f"expert '{name}' ({key}, model '{card.name}') has no weights on this machine, so "
            f"it cannot teach the student. {card.missing_weights_message()} Or set "
            f"{key}.weights to the file, or {key}.optional=true to train without this expert.")


def resolve_experts(cfg: Config) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The expert entries to build (name -> entry) and notes on the ones left out.

    Checks that every registry expert's weights are on this machine, reading no weights;
    a missing one raises ``WeightsNotFoundError`` naming the expert and how to get the file,
    unless the entry says ``optional: true``. Experts whose loss weights are both 0 are
    switched off.
    """
    from napari_gpfm.encoders import WeightsNotFoundError

    active: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for name, spec in cfg["experts"]["models"].items():
        key = f"experts.models.{name}"
        w = _loss_weights(spec)
        if w.cls <= 0 and w.patch <= 0:
            notes.append(f"{key}: cls_weight and patch_weight are both 0: expert switched off")
            continue
        problem = _missing_weights(name, spec) if "encoder" in spec else None
        if problem is not None:
            if not spec.get("optional", False):
                raise WeightsNotFoundError(problem)
            notes.append(f"{key} is optional and its weights are missing: training without "
                         f"expert '{name}' ({problem.split('. ')[0]})")
            continue
        active[name] = spec
    return active, notes


def build_experts(
    cfg: Config, device: torch.device, specs: dict[str, dict[str, Any]] | None = None
) -> tuple[dict[str, FrozenExpert], dict[str, ExpertWeights]]:
    """Experts with a positive CLS or patch weight (``specs``: the entries
    :func:`resolve_experts` kept), and their loss weights, keyed by config name."""
    if specs is None:
        specs, _ = resolve_experts(cfg)
    experts: dict[str, FrozenExpert] = {}
    weights: dict[str, ExpertWeights] = {}
    for name, spec in specs.items():
        w = _loss_weights(spec)
        if "timm" in spec:
            expert: FrozenExpert = TimmExpert(
                spec["timm"]["name"], spec["timm"].get("kwargs", {}),
                spec.get("cls_target", "embedding"), spec.get("input_size"))
        else:
            expert = RegistryExpert(
                spec["encoder"], spec.get("weights"), device,
                bool(spec.get("allow_random", False)), int(cfg["train"]["seed"]),
                spec.get("cls_target", "embedding"), spec.get("input_size"),
            )
        experts[name], weights[name] = expert.to(device), w
    return experts, weights
