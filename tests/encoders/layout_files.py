"""Tiny checkpoints in each ``checkpoint_layout``, with the real naming of the files they stand
for (GPFM's release, timm/UNI, Phikon's Hugging Face ViTModel, CONCH's CoCa), written by tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import card_dict, gpfm_release, write_card

BASE_KW = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
PIXELS = torch.randint(0, 256, (2, 32, 32, 3), generator=torch.Generator().manual_seed(3),
                       dtype=torch.uint8)


def expert_card(models_dir: Path, name: str, layout: str, arch: dict, embed_dim: int = 32,
                **extra) -> None:
    data = card_dict(name, is_gpfm=False, architecture=arch, checkpoint_layout=layout,
                     embed_dim=embed_dim, **extra)
    data["input"] = {**data["input"], "size": 32}
    write_card(models_dir, data)


def legacy_hf_vit(timm_sd: dict) -> dict:
    """A timm ViT state dict under the names of a Hugging Face ViTModel saved by transformers 4
    (as in owkin/phikon's pytorch_model.bin), with the pooler that Phikon does not use."""
    out = {"embeddings.cls_token": timm_sd["cls_token"],
           "embeddings.position_embeddings": timm_sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": timm_sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": timm_sd["patch_embed.proj.bias"],
           "layernorm.weight": timm_sd["norm.weight"], "layernorm.bias": timm_sd["norm.bias"],
           "pooler.dense.weight": torch.zeros(32, 32), "pooler.dense.bias": torch.zeros(32)}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after",
             "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
             "mlp.fc2": "output.dense"}
    for i in range(2):
        for param in ("weight", "bias"):
            for timm_name, hf_name in names.items():
                tensor = timm_sd[f"blocks.{i}.{timm_name}.{param}"]
                out[f"encoder.layer.{i}.{hf_name}.{param}"] = tensor
            q, k, v = timm_sd[f"blocks.{i}.attn.qkv.{param}"].chunk(3, dim=0)
            for part, tensor in (("query", q), ("key", k), ("value", v)):
                out[f"encoder.layer.{i}.attention.attention.{part}.{param}"] = tensor
    return out




# CONCH's head parameter names (CoCa VisualModel with an nn.MultiheadAttention pooler whose
# key/value width differs from its query width, hence separate q/k/v projection weights).
CONCH_HEAD_KEYS = {
    "visual.attn_pool_contrast.query", "visual.attn_pool_contrast.attn.q_proj_weight",
    "visual.attn_pool_contrast.attn.k_proj_weight", "visual.attn_pool_contrast.attn.v_proj_weight",
    "visual.attn_pool_contrast.attn.in_proj_bias", "visual.attn_pool_contrast.attn.out_proj.weight",
    "visual.attn_pool_contrast.attn.out_proj.bias", "visual.attn_pool_contrast.ln_q.weight",
    "visual.attn_pool_contrast.ln_q.bias", "visual.attn_pool_contrast.ln_k.weight",
    "visual.attn_pool_contrast.ln_k.bias", "visual.ln_contrast.weight", "visual.ln_contrast.bias",
    "visual.proj_contrast",
}


def coca_checkpoint(vision_sd: dict) -> dict:
    """A CONCH-style CoCa checkpoint: the vision tower under ``visual.``, plus the captioning
    pooler, text tower, decoder and temperature that the encoder must drop."""
    ckpt = {f"visual.{k}": v for k, v in vision_sd.items()}
    ckpt.update({"visual.attn_pool_caption.query": torch.zeros(4, 16),
                 "visual.ln_caption.weight": torch.ones(16),
                 "text.token_embedding.weight": torch.zeros(10, 16),
                 "text.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(48, 16),
                 "text_decoder.ln_final.weight": torch.ones(16),
                 "logit_scale": torch.tensor(4.6)})
    return ckpt




@dataclass(frozen=True)
class LayoutFile:
    """How to make a card of one layout and a checkpoint of it from a reference state dict."""

    architecture: dict
    embed_dim: int
    make: Callable[[dict], dict]  # reference timm state dict -> the checkpoint as saved
    flat: Callable[[dict], dict]  # the same tensors as one flat mapping (for .safetensors)


def _gpfm_release(sd: dict) -> dict:
    return gpfm_release(sd, chunks=2, global_inner_index=True)


_VIT = {"timm_name": "vit_base_patch16_224", "kwargs": {**BASE_KW, "init_values": 1e-5}}
_POOL = {"type": "attentional", "dim": 16, "heads": 2, "project": True, "normalize": True}

#: One entry per layout of ``encoders.card.LAYOUTS`` (the tests check the two lists agree).
LAYOUT_FILES = {
    "gpfm": LayoutFile(_VIT, 32, _gpfm_release, lambda sd: _gpfm_release(sd)["teacher"]),
    "timm": LayoutFile(_VIT, 32, lambda sd: {"state_dict": sd}, dict),
    "phikon": LayoutFile({"timm_name": "vit_base_patch16_224", "kwargs": BASE_KW,
                          "norm_eps": 1e-12}, 32, legacy_hf_vit, legacy_hf_vit),
    "conch": LayoutFile({"timm_name": "vit_base_patch16_224",
                         "kwargs": {**BASE_KW, "dynamic_img_size": True}, "pool": _POOL},
                        16, coca_checkpoint, coca_checkpoint),
}
