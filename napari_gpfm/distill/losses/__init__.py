"""Distillation losses, one module each; every loss is an ``nn.Module`` owning its state."""

from .dino_cls import DINOClsLoss
from .expert_cls import ExpertClsLoss
from .expert_patch import ExpertPatchLoss, resize_patch_grid
from .ibot_patch import IBOTPatchLoss
from .koleo import KoLeoLoss
from .supervised import SupervisedLoss

__all__ = [
    "DINOClsLoss",
    "ExpertClsLoss",
    "ExpertPatchLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "SupervisedLoss",
    "resize_patch_grid",
]
