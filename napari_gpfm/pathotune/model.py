"""PathoTune around a frozen timm ViT: prompt tokens in every block and a linear head.

Token layout at the input of block ``i`` (``P`` prefix tokens = CLS and any register tokens)::

    [ prefix (P) | TVP_i (N) | TTP (T) | IVP (M, blocks >= k) | patches (L) ]

* TVP (deep): the ``N`` positions after the prefix hold block ``i``'s own prompts; whatever block
  ``i − 1`` wrote there is discarded (VPT-deep).
* TTP: ``T = 1 + K`` projected text tokens enter before block 0 and are carried through (their
  outputs evolve like the CLS token's); see :mod:`.text`.
* IVP: the Visual Refine Module reads the patch tokens entering block ``k`` (``ivp_block``,
  default ``depth // 3``, at least 1: early features already mixed by ``k`` blocks) and inserts
  ``M`` instance tokens there, carried through the remaining blocks.

Head: ``Linear`` on the final-normed CLS token (``head="cls"``, default: directly comparable with
a linear probe on frozen CLS embeddings), or on CLS concatenated with the mean of all prompt
outputs of the last block (``head="cls+prompts"``, the VPT prompt-pooling variant). A backbone
without a CLS token uses the mean of its patch tokens instead.

The backbone is frozen: ``requires_grad`` off, always in eval mode (``train()`` never changes
it, so dropout/drop-path stay off), and no parameter of it ever gets a gradient; gradients flow
*through* its activations to the prompts, the refine module, the projection and the head.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .prompts import TaskVisualPrompts, VisualRefineModule
from .text import TaskTextPrompts, TextEncoder, TextTemplate, encode_sentences

__all__ = [
    "HEADS",
    "PathoTuneClassifier",
    "PathoTuneModel",
    "PromptConfig",
    "TokenLayout",
    "backbone_identity",
    "build_classifier",
    "vit_trunk",
]

HEADS = ("cls", "cls+prompts")


@dataclass(frozen=True)
class PromptConfig:
    """Which prompts are on, and their sizes. All off = a linear probe on the frozen CLS token.

    tvp/n_tvp: task visual prompts per block. ttp: text prompts (``1 + K`` tokens).
    ivp/n_ivp/ivp_block/ivp_rank: instance prompts, the block they enter (``None``: depth // 3,
    at least 1) and the refine module's rank. head: ``"cls"`` or ``"cls+prompts"``.
    """

    tvp: bool = True
    n_tvp: int = 8
    ttp: bool = True
    ivp: bool = True
    n_ivp: int = 4
    ivp_block: int | None = None
    ivp_rank: int = 64
    head: str = "cls"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.tvp and self.n_tvp < 1:
            raise ValueError(f"n_tvp must be >= 1 when TVP is on, got {self.n_tvp}")
        if self.ivp and self.n_ivp < 1:
            raise ValueError(f"n_ivp must be >= 1 when IVP is on, got {self.n_ivp}")

    @property
    def label(self) -> str:
        """Short name of the prompt combination, e.g. ``"TVP+TTP"`` or ``"none"``."""
        on = [n for n, f in (("TVP", self.tvp), ("TTP", self.ttp), ("IVP", self.ivp)) if f]
        return "+".join(on) or "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromptConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class TokenLayout:
    """Token counts at the input of one block (see module docstring)."""

    prefix: int
    tvp: int
    ttp: int
    ivp: int
    patches: int

    @property
    def total(self) -> int:
        return self.prefix + self.tvp + self.ttp + self.ivp + self.patches


def vit_trunk(backbone: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside ``backbone`` (unwrapping pooled heads such as CONCH's)."""
    trunk = getattr(backbone, "trunk", backbone)
    needed = ("patch_embed", "_pos_embed", "blocks", "norm")
    missing = [n for n in needed if not hasattr(trunk, n)]
    if missing:
        raise TypeError(
            f"PathoTune needs a timm VisionTransformer backbone; {type(trunk).__name__} lacks "
            f"{', '.join(missing)}"
        )
    return trunk


def _patch_side(trunk: nn.Module) -> int:
    ps = getattr(trunk.patch_embed, "patch_size", 16)
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


class PathoTuneModel(nn.Module):
    """Frozen ViT + switchable TVP / TTP / IVP + linear head; ``forward(x) -> logits``.

    ``x`` is a preprocessed batch (B, 3, S, S). ``text_embeddings`` ((T, D) float) are required
    when ``config.ttp`` is on.
    """

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        config: PromptConfig,
        text_embeddings: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.backbone = backbone
        # Not registered as a submodule: it is (part of) ``backbone`` already.
        object.__setattr__(self, "trunk", vit_trunk(backbone))
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.config = config
        dim = int(self.trunk.embed_dim)
        self.depth = len(self.trunk.blocks)
        self.dim = dim
        self.n_prefix = int(getattr(self.trunk, "num_prefix_tokens", 1))
        self.has_cls = getattr(self.trunk, "cls_token", None) is not None
        self.tvp = (
            TaskVisualPrompts(self.depth, config.n_tvp, dim, _patch_side(self.trunk))
            if config.tvp else None
        )
        if config.ttp:
            if text_embeddings is None:
                raise ValueError("text prompts (TTP) are on but no text embeddings were given")
            self.ttp: TaskTextPrompts | None = TaskTextPrompts(text_embeddings, dim)
        else:
            self.ttp = None
        if config.ivp:
            k = config.ivp_block if config.ivp_block is not None else max(1, self.depth // 3)
            if not 0 <= k < self.depth:
                raise ValueError(f"ivp_block must be in [0, {self.depth}), got {k}")
            self.ivp_block = int(k)
            self.ivp: VisualRefineModule | None = VisualRefineModule(
                dim, config.n_ivp, config.ivp_rank
            )
        else:
            self.ivp_block = -1
            self.ivp = None
        head_in = dim * (2 if config.head == "cls+prompts" and self._has_prompts else 1)
        self.head = nn.Linear(head_in, n_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def _has_prompts(self) -> bool:
        return bool(self.config.tvp or self.config.ttp or self.config.ivp)

    @property
    def n_classes(self) -> int:
        return int(self.head.out_features)

    def layout(self, block: int, n_patches: int) -> TokenLayout:
        """Token counts entering ``block``."""
        return TokenLayout(
            prefix=self.n_prefix,
            tvp=self.tvp.n_tokens if self.tvp is not None else 0,
            ttp=self.ttp.n_tokens if self.ttp is not None else 0,
            ivp=self.ivp.n_tokens if self.ivp is not None and block >= self.ivp_block else 0,
            patches=n_patches,
        )

    def train(self, mode: bool = True) -> PathoTuneModel:
        """Train/eval the prompt modules; the backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def n_backbone(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not the backbone's (prompts, refine, projection, text, head)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input (B, head_in) for a preprocessed batch."""
        t = self.trunk
        b = x.shape[0]
        tokens = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x))))
        prefix, patches = tokens[:, : self.n_prefix], tokens[:, self.n_prefix :]
        n_tvp = self.tvp.n_tokens if self.tvp is not None else 0
        text = self.ttp(b).to(tokens.dtype) if self.ttp is not None else tokens[:, :0]
        inst = tokens[:, :0]
        for i, block in enumerate(t.blocks):
            if self.ivp is not None and i == self.ivp_block:
                inst = self.ivp(patches).to(tokens.dtype)
            vis = self.tvp(i, b).to(tokens.dtype) if self.tvp is not None else tokens[:, :0]
            out = block(torch.cat([prefix, vis, text, inst, patches], dim=1))
            prefix, vis_out, rest = out.split(
                [self.n_prefix, n_tvp, out.shape[1] - self.n_prefix - n_tvp], dim=1
            )
            text, inst, patches = rest.split(
                [text.shape[1], inst.shape[1], rest.shape[1] - text.shape[1] - inst.shape[1]],
                dim=1,
            )
        final = t.norm(torch.cat([prefix, vis_out, text, inst, patches], dim=1))
        n_prompt = n_tvp + text.shape[1] + inst.shape[1]
        pooled = final[:, 0] if self.has_cls else final[:, self.n_prefix + n_prompt :].mean(1)
        if self.config.head == "cls+prompts" and n_prompt:
            prompts = final[:, self.n_prefix : self.n_prefix + n_prompt].mean(1)
            pooled = torch.cat([pooled, prompts], dim=1)
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) for a preprocessed batch (B, 3, S, S)."""
        return self.head(self.features(x))


#: Tiling keys of the training grid's recipe a classifier reports in ``recipe``.
_GRID_KEYS = ("target_mpp", "patch_size", "overlap", "min_tissue", "tissue_params")


def backbone_identity(encoder: Any) -> dict[str, Any]:
    """What a classifier file records to refuse other backbones: card name, weights SHA-256,
    timm architecture + kwargs, width and depth."""
    trunk = vit_trunk(encoder.model)
    arch = encoder.card.architecture
    return {
        "name": str(encoder.card.name),
        "weights_sha256": str(encoder.weights_sha256),
        "timm_name": str(arch.timm_name),
        "kwargs": {str(k): v for k, v in dict(arch.kwargs).items()},
        "embed_dim": int(trunk.embed_dim),
        "depth": len(trunk.blocks),
        "input_size": int(encoder.card.input.size),
    }


@dataclass(eq=False)
class PathoTuneClassifier:
    """A PathoTune model with what it needs at prediction time and what a file records.

    ``encoder`` supplies the frozen backbone and its preprocessing; ``class_names`` fix the
    logit order; ``colours`` are (K, 3) uint8 RGB (the class palette); ``template`` and
    ``sentences`` describe the text prompts; ``info`` holds free-form training metadata
    (validation scores, tile geometry, train config), written to the classifier file.

    Implements :class:`~napari_gpfm.analyses.classifier.Classifier` (``kind`` ``"pathotune"``):
    :attr:`recipe`, :meth:`save`, :meth:`check_store`, :meth:`predict_store`.
    """

    kind: ClassVar[str] = "pathotune"
    encoder: Any
    model: PathoTuneModel
    class_names: list[str]
    colours: np.ndarray | None = None
    template: TextTemplate | None = None
    sentences: list[str] = field(default_factory=list)
    text_encoder_name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> PromptConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.backbone.parameters()).device

    # --- the Classifier protocol ---------------------------------------------------------------
    @property
    def recipe(self) -> dict[str, Any]:
        """The backbone (``model``, ``weights_sha256``) and the tiling of the grid it was
        trained on (``target_mpp``, ``patch_size``, ``overlap``, ``min_tissue``,
        ``tissue_params`` as far as recorded; ``patch_size_level0`` and level-0 ``mpp`` of the
        training slide)."""
        tiles = self.info.get("tiles") or {}
        grid = tiles.get("recipe") or {}
        out = {k: grid[k] for k in _GRID_KEYS if grid.get(k) is not None}
        if tiles.get("target_mpp") is not None:
            out.setdefault("target_mpp", tiles["target_mpp"])
        for k in ("patch_size_level0", "mpp"):
            if tiles.get(k) is not None:
                out[k] = tiles[k]
        out["model"] = str(self.encoder.card.name)
        out["weights_sha256"] = str(self.encoder.weights_sha256)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ``.safetensors`` classifier file (:func:`~.io.save_classifier`)."""
        from .io import save_classifier

        return save_classifier(self, path)

    def check_store(self, store: Any, source: str | os.PathLike | None = None,
                    assume_model: str | None = None) -> None:  # fmt: skip
        """Refuse patches of another physical size than the training patches
        (:func:`~.predict.check_geometry`); the features themselves are not used."""
        from .predict import check_geometry

        check_geometry(self, store, source)

    def predict_store(self, store: Any, assume_model: str | None = None, *,
                      slide_path: str | os.PathLike | None = None, batch_size: int = 32,
                      num_workers: int | None = None) -> Any:  # fmt: skip
        """Every patch of ``store``'s grid (a feature store, whose recorded slide file, or
        ``slide_path``, gives the pixels; or a ``PatchSet``), read and classified: the
        :class:`~napari_gpfm.analyses.classifier.Prediction`, row ``i`` for row ``i``."""
        from .predict import predict_slide, store_patches
        from .train import run

        self.check_store(store)
        return run(predict_slide(self, store_patches(store, slide_path), batch_size,
                                 num_workers))

    def set_template(self, template: TextTemplate, text_encoder: TextEncoder | None = None) -> None:
        """Re-encode the text prompts for a new template (same classes)."""
        if self.model.ttp is None:
            raise ValueError("text prompts (TTP) are off in this classifier")
        sentences, emb = encode_sentences(template, self.class_names, text_encoder)
        self.model.ttp.set_text(emb)
        self.template, self.sentences = template, sentences


def build_classifier(
    encoder: Any,
    class_names: Sequence[str],
    config: PromptConfig | None = None,
    template: TextTemplate | None = None,
    text_encoder: TextEncoder | None = None,
    colours: np.ndarray | None = None,
    seed: int = 0,
) -> PathoTuneClassifier:
    """A fresh (untrained) PathoTune classifier on ``encoder``'s frozen backbone.

    Text prompts encode ``template`` (default :class:`TextTemplate`) with ``text_encoder``
    (default: the offline MiniLM). Prompt/head initialisation is seeded with ``seed`` without
    touching the global RNG.
    """
    config = config or PromptConfig()
    names = [str(c) for c in class_names]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"a classifier needs at least two distinct class names, got {names}")
    sentences: list[str] = []
    emb = None
    text_name = None
    if config.ttp:
        template = template or TextTemplate()
        sentences, emb = encode_sentences(template, names, text_encoder)
        text_name = getattr(text_encoder, "name", None) or "sentence-transformers/all-MiniLM-L6-v2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PathoTuneModel(encoder.model, len(names), config, emb)
    model.to(next(encoder.model.parameters()).device)
    cols = None if colours is None else np.asarray(colours, dtype=np.uint8).reshape(-1, 3)
    return PathoTuneClassifier(
        encoder=encoder, model=model, class_names=names, colours=cols,
        template=template, sentences=sentences,
        text_encoder_name=text_name,
    )
