"""`Encoder`: a timm network built from a model card, with its preprocessing and weights record.

``load_encoder("gpfm")`` finds the weights (see `ModelCard.resolve_weights`), builds the network,
converts and strictly loads the checkpoint and records its SHA-256, so every embedding can be
traced to the exact file. Without weights it raises `WeightsNotFoundError` explaining how to get
them; ``allow_random=True`` builds a seeded random network instead (tests, benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .card import ModelCard
from .checkpoint import load_weights, sha256_file
from .errors import CheckpointError, ModelCardError, WeightsNotFoundError
from .pooling import PooledViT
from .registry import get_card

RANDOM_INIT_PREFIX = "random-init-seed-"


def normalize_uint8(x: torch.Tensor, size: int, interpolation: str, mean: torch.Tensor,
                    std: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """uint8 NHWC images → normalised float NCHW of side ``size``, on ``x``'s device: scaled to
    [0, 1], resized (antialiased) when needed, then ``(x - mean) / std``. Only uint8 crosses
    the host-device bus; the float work happens where ``x`` is."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode=interpolation, align_corners=False,
                          antialias=True).clamp_(0.0, 1.0)  # fmt: skip
    return (x - mean) / std


class EmbeddingModule(nn.Module):
    """uint8 NHWC → embeddings (B, D): normalisation on the device, then the network's
    ``forward_features`` and ``forward_head(pre_logits=True)``."""

    def __init__(self, model: nn.Module, size: int, interpolation: str, mean: torch.Tensor,
                 std: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.size = int(size)
        self.interpolation = interpolation
        self.register_buffer("mean", mean.detach().clone(), persistent=False)
        self.register_buffer("std", std.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize_uint8(x, self.size, self.interpolation, self.mean, self.std)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def build_model(card: ModelCard) -> nn.Module:
    """The card's network, randomly initialised, in eval mode (no weights are read)."""
    arch = card.architecture
    try:
        model = timm.create_model(arch.timm_name, pretrained=False, **arch.kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:  # unknown name or bad kwargs
        raise ModelCardError(
            card.path, f"cannot build '{arch.timm_name}' with kwargs {arch.kwargs}: {exc}"
        ) from exc
    if arch.norm_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = arch.norm_eps
    if arch.pool is not None:
        pool = arch.pool
        model = PooledViT(model, pool.dim, pool.heads, pool.project, pool.normalize)
    if model.num_features != card.embed_dim:
        raise ModelCardError(
            card.path,
            f"'embed_dim' is {card.embed_dim} but the architecture outputs {model.num_features}",
        )
    return model.eval()


class Encoder:
    """A model card's network with its preprocessing and the identity of its weights.

    Attributes: ``model`` (the torch module), ``card``, ``weights_path`` (None for random init)
    and ``weights_sha256`` (hex digest, or ``"random-init-seed-<seed>"``).
    """

    def __init__(self, model: nn.Module, card: ModelCard, weights_path: Path | None,
                 weights_sha256: str):
        self.model = model
        self.card = card
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256

    def __repr__(self) -> str:
        return (f"Encoder({self.card.name!r}, dim={self.embed_dim}, device={self.device}, "
                f"weights={str(self.weights_path) if self.weights_path else self.weights_sha256})")

    @property
    def embed_dim(self) -> int:
        """Width of `embed` (e.g. 1024 for GPFM, 512 for CONCH's pooled output)."""
        return self.card.embed_dim

    @property
    def token_dim(self) -> int:
        """Width of the tokens from `tokens` (the trunk width; differs from ``embed_dim`` for
        pooled heads such as CONCH's)."""
        return self.model.embed_dim

    @property
    def input_size(self) -> int:
        return self.card.input.size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_random_init(self) -> bool:
        return self.weights_sha256.startswith(RANDOM_INIT_PREFIX)

    def to(self, device: str | torch.device) -> Encoder:
        """Move the network to ``device``; returns self."""
        self.model.to(device)
        return self

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB images (N, H, W, 3) or one (H, W, 3) -> normalised float (N, 3, S, S) on the
        encoder's device: resized to the card's input size when needed, scaled to [0, 1],
        normalised with the card's mean and std."""
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"{self.card.name}: preprocess expects uint8 RGB images shaped (N, H, W, 3), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        x = x.to(self.device, non_blocking=True)
        mean, std = self._norm_stats(x.device)
        return normalize_uint8(x, self.input_size, self.card.input.interpolation, mean, std)

    def _norm_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The card's mean and std as (1, 3, 1, 1) tensors on ``device``, made once per device
        (no host-to-device copy per batch)."""
        cache = self.__dict__.setdefault("_stats", {})
        if device not in cache:
            cache[device] = (
                torch.tensor(self.card.input.mean, device=device).view(1, 3, 1, 1),
                torch.tensor(self.card.input.std, device=device).view(1, 3, 1, 1),
            )
        return cache[device]

    def embedding_module(self) -> nn.Module:
        """An ``nn.Module`` from uint8 NHWC images (on the model's device) to embeddings: the
        same computation as ``embed(preprocess(x))``, in one module that ``torch.compile`` can
        take whole."""
        mean, std = self._norm_stats(self.device)
        return EmbeddingModule(self.model, self.input_size, self.card.input.interpolation,
                               mean, std)  # fmt: skip

    @torch.inference_mode()
    def embed(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Embeddings (B, embed_dim): the CLS token after the final norm (CONCH: the pooled,
        projected token). ``x`` is a `preprocess`-ed batch; uint8 images are preprocessed here."""
        x = self._prepared(x)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def tokens(self, x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS (B, token_dim), patch tokens (B, N, token_dim)), both after the final norm.
        Runs under the caller's grad mode (distillation may need gradients)."""
        feats = self.model.forward_features(self._prepared(x))
        return feats[:, 0], feats[:, self.model.num_prefix_tokens:]

    def _prepared(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(x, np.ndarray) or x.dtype == torch.uint8:
            return self.preprocess(x)
        return x.to(self.device)


def load_encoder(
    name_or_card: str | ModelCard,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_random: bool = False,
    seed: int = 0,
) -> Encoder:
    """Build a card's encoder and load its weights (explicit ``weights`` path first, then the
    card's file, environment variable and default path).

    Missing weights raise `WeightsNotFoundError` saying which file to get and where to put it,
    unless ``allow_random`` is set: then the network is randomly initialised with ``seed`` and
    ``weights_sha256`` is ``"random-init-seed-<seed>"``. A known ``weights.sha256`` that does not
    match the file raises `CheckpointError`.
    """
    card = name_or_card if isinstance(name_or_card, ModelCard) else get_card(name_or_card)
    path = card.resolve_weights(weights)
    if path is not None and not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: the weights file given for model '{card.name}' does not exist."
        )
    if path is None:
        if not allow_random:
            raise WeightsNotFoundError(card.missing_weights_message())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(card)
        return Encoder(model.to(device), card, None, f"{RANDOM_INIT_PREFIX}{seed}")
    model = build_model(card)
    digest = sha256_file(path)
    if card.weights.sha256 and digest != card.weights.sha256:
        raise CheckpointError(
            path,
            f"SHA-256 {digest} does not match {card.weights.sha256} recorded for "
            f"'{card.name}': the file is damaged or a different release; download it again.",
        )
    load_weights(model, path, model_name=card.name, expected_layout=card.checkpoint_layout)
    return Encoder(model.to(device), card, path, digest)
