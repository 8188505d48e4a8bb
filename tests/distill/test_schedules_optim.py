"""Per-step schedules and the AdamW parameter groups."""

from __future__ import annotations

import numpy as np
import pytest

from napari_gpfm.distill.meta_arch import DistillMetaArch
from napari_gpfm.distill.optim import apply_schedules, build_optimizer, layer_id
from napari_gpfm.distill.schedules import build_schedules, cosine_schedule


def test_cosine_schedule_warms_up_then_decays_to_the_end_value():
    values = cosine_schedule(1.0, 0.0, total_steps=6, warmup_steps=2)
    assert np.allclose(values[:2], [0.0, 0.5])
    assert values[2] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0)
    assert np.all(np.diff(values[2:]) < 0)


def test_run_schedules(tiny_config):
    cfg = tiny_config(**{"train.steps": 10, "teacher.warmup_temp_steps": 4})
    s = build_schedules(cfg, peak_lr=1e-3, freeze_last_layer_steps=3)
    assert np.allclose(s.teacher_temp[:4], np.linspace(0.04, 0.07, 4, endpoint=False))
    assert np.allclose(s.teacher_temp[4:], 0.07)
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[-1] == pytest.approx(1.0)
    assert s.weight_decay[-1] == pytest.approx(0.4)
    assert list(s.last_layer_lr_factor[:4]) == [0, 0, 0, 1]
    assert s.at(2)["lr"] == pytest.approx(1e-3)  # warm-up is 2 steps


def test_param_groups_decay_layers_and_skip_weight_decay_on_norms_and_biases(tiny_config):
    cfg = tiny_config()
    meta = DistillMetaArch(cfg, {}, {})
    optimizer = build_optimizer(meta.student, cfg, n_blocks=2)
    apply_schedules(optimizer, lr=1.0, weight_decay=0.5, last_layer_lr_factor=0.0)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = dict(meta.student.named_parameters())
    group = lambda name: by_param[id(named[name])]  # noqa: E731
    assert group("backbone.vit.blocks.0.attn.qkv.bias")["weight_decay"] == 0
    assert group("backbone.vit.blocks.0.norm1.weight")["weight_decay"] == 0
    assert group("backbone.vit.blocks.0.attn.qkv.weight")["weight_decay"] == 0.5
    assert group("backbone.vit.blocks.0.attn.qkv.weight")["lr"] == pytest.approx(0.9**2)
    assert group("backbone.vit.blocks.1.attn.qkv.weight")["lr"] == pytest.approx(0.9)
    assert group("backbone.vit.patch_embed.proj.weight")["lr"] == pytest.approx(0.9**3 * 0.2)
    assert group("dino_head.last_layer.weight")["lr"] == 0  # frozen
    assert group("dino_head.mlp.0.weight")["lr"] == pytest.approx(1.0)
    assert layer_id("dino_head.mlp.0.weight", 2) == 3
