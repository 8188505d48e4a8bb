"""AdamW over the student with layer-wise lr decay and DINOv2-style parameter groups.

Every student parameter gets an ``lr_multiplier`` (layer-wise decay ``d^(L+1-layer)``, times the
patch-embed multiplier), a ``wd_multiplier`` (0 for biases, norms and other 1-D parameters such as
LayerScale gains) and an ``is_last_layer`` flag (prototype layers and, as in GPFM, the expert
heads' last layers, frozen at the start).
Parameters sharing all three form one group; :func:`apply_schedules` sets lr and wd per step.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .config import Config
from .meta_arch import is_last_layer

BACKBONE_PREFIX = "backbone."
EMBEDDING_NAMES = (
    "vit.patch_embed", "vit.cls_token", "vit.pos_embed", "vit.reg_token", "mask_token"
)


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings, i + 1 for block i, n_blocks + 1 for the final norm and all heads."""
    if not name.startswith(BACKBONE_PREFIX):
        return n_blocks + 1
    name = name[len(BACKBONE_PREFIX) :]
    if name.startswith(EMBEDDING_NAMES):
        return 0
    if name.startswith("vit.blocks."):
        return int(name.split(".")[2]) + 1
    return n_blocks + 1


def param_groups(student: nn.Module, cfg: Config, n_blocks: int) -> list[dict]:
    """AdamW parameter groups with lr/wd multipliers and the last-layer flag."""
    optim = cfg["optim"]
    grouped: dict[tuple[float, float, bool], list[nn.Parameter]] = defaultdict(list)
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = optim["layerwise_decay"] ** (n_blocks + 1 - layer_id(name, n_blocks))
        if name.startswith(BACKBONE_PREFIX + "vit.patch_embed"):
            lr_mult *= optim["patch_embed_lr_mult"]
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "norm" in name
        is_last = is_last_layer(name, cfg)
        grouped[(lr_mult, 0.0 if no_decay else 1.0, is_last)].append(param)
    return [
        {"params": params, "lr_multiplier": lr, "wd_multiplier": wd, "is_last_layer": last}
        for (lr, wd, last), params in grouped.items()
    ]


def build_optimizer(student: nn.Module, cfg: Config, n_blocks: int) -> torch.optim.AdamW:
    """AdamW (``optim.betas``); lr and wd are set every step by :func:`apply_schedules`."""
    groups = param_groups(student, cfg, n_blocks)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg["optim"]["betas"]))


def apply_schedules(
    optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, last_layer_lr_factor: float
) -> None:
    """Set every group's lr and weight decay for the current step."""
    for group in optimizer.param_groups:
        factor = last_layer_lr_factor if group["is_last_layer"] else 1.0
        group["lr"] = lr * group["lr_multiplier"] * factor
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
