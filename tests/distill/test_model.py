"""Backbone mask path, heads, and the meta-architecture's term switches and EMA."""

from __future__ import annotations

import timm
import torch

from napari_gpfm.distill.backbone import build_backbone, export_kwargs
from napari_gpfm.distill.heads import DINOHead, ExpertHead
from napari_gpfm.distill.meta_arch import DistillMetaArch


def test_fully_masked_images_look_identical_to_the_backbone(tiny_config):
    backbone = build_backbone(tiny_config(), drop_path_rate=0.0).eval()
    images = torch.randn(2, 3, 56, 56)
    cls, patch = backbone(images)
    assert cls.shape == (2, 48) and patch.shape == (2, 16, 48)
    assert not torch.allclose(cls[0], cls[1])
    cls, patch = backbone(images, torch.ones(2, 16, dtype=torch.bool))
    assert torch.allclose(cls[0], cls[1]) and torch.allclose(patch[0], patch[1])
    assert backbone(torch.randn(1, 3, 28, 28))[1].shape == (1, 4, 48)  # local crops


def test_backbone_state_loads_strictly_into_the_exported_timm_architecture(tiny_config):
    cfg = tiny_config()
    backbone = build_backbone(cfg, drop_path_rate=0.0)
    model = timm.create_model(cfg["student"]["arch"], pretrained=False, **export_kwargs(cfg))
    model.load_state_dict(backbone.vit.state_dict(), strict=True)


def test_heads_project_to_prototypes_and_expert_space():
    head = DINOHead(48, n_prototypes=64, hidden_dim=32, bottleneck_dim=16, n_layers=3)
    logits = head(torch.randn(5, 48))
    assert logits.shape == (5, 64) and logits.abs().max() <= 1 + 1e-5  # cosines
    expert = ExpertHead(48, expert_dim=24, bottleneck_dim=8)
    assert expert(torch.randn(2, 7, 48)).shape == (2, 7, 24)


def test_teacher_matches_student_at_start_and_follows_by_ema(tiny_config):
    meta = DistillMetaArch(tiny_config(**{"ibot.separate_head": True}), {}, {})
    assert set(meta.teacher) == {"backbone", "dino_head", "ibot_head"}
    assert not any(p.requires_grad for p in meta.teacher.parameters())
    s = meta.student["dino_head"].mlp[0].weight
    t = meta.teacher["dino_head"].mlp[0].weight
    assert torch.equal(s, t)
    with torch.no_grad():
        s.add_(1.0)
    meta.update_teacher(momentum=0.75)
    assert torch.allclose(t, s - 0.75)
    meta.train()
    assert meta.student.training and not meta.teacher.training
