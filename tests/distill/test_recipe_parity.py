"""Each item of issue #11 point 3, pinned against the value GPFM's or DINOv2's code gives.

References: GPFM ``pretrain/dinov2`` (configs/train/distill_vitl14_192M_exclude_split1.yaml,
train/ssl_meta_arch.py, fms.py, kl_loss.py, train/train.py) and DINOv2 (loss/, data/masking.py,
data/transforms.py, utils/param_groups.py), read at their public repositories' HEAD.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_gpfm.distill.backbone import build_backbone, drop_path_rates
from napari_gpfm.distill.config import ConfigError, load_config, load_defaults
from napari_gpfm.distill.experts import TimmExpert
from napari_gpfm.distill.losses import DINOClsLoss, ExpertClsLoss, KoLeoLoss
from napari_gpfm.distill.losses.centering import sinkhorn_knopp
from napari_gpfm.distill.masking import BlockMaskGenerator
from napari_gpfm.distill.meta_arch import DistillMetaArch
from napari_gpfm.distill.optim import param_groups
from napari_gpfm.distill.schedules import build_schedules
from napari_gpfm.distill.train import TrainingRun

# GPFM's ViT-L run: OFFICIAL_EPOCH_LENGTH 1250, epochs 400, warmup_epochs 40,
# warmup_teacher_temp_epochs 30, freeze_last_layer_epochs 1, drop_path_rate 0.4 uniform
EPOCH = 1250


def test_default_length_and_schedules_are_gpfms():
    d = load_defaults()
    assert d["train"]["steps"] == 400 * EPOCH
    assert d["schedules"]["warmup_steps"] == 40 * EPOCH
    assert d["teacher"]["warmup_temp_steps"] == 30 * EPOCH
    assert d["schedules"]["freeze_last_layer_steps"] == 1 * EPOCH
    assert d["student"]["drop_path_rate"] == 0.4 and d["student"]["drop_path_uniform"]
    assert d["student"]["layerscale_init"] == 1e-5
    assert d["optim"]["clip_grad_scope"] == "per_module" and d["experts"]["cls_loss"] == "cosine"


def test_last_layer_frozen_a_fixed_1250_steps_whatever_the_data(tiny_config):
    cfg = tiny_config(**{"train.steps": 3000, "schedules.freeze_last_layer_steps": EPOCH})
    factor = build_schedules(cfg, 1e-3, EPOCH).last_layer_lr_factor
    assert (factor[:EPOCH] == 0).all() and (factor[EPOCH:] == 1).all()
    run = TrainingRun(tiny_config(**{"train.steps": 3000,
                                     "schedules.freeze_last_layer_steps": EPOCH}))
    assert run.schedules.last_layer_lr_factor[EPOCH - 1] == 0  # not ceil(32 tiles / 4) = 8
    assert run.schedules.last_layer_lr_factor[EPOCH] == 1


def test_drop_path_is_uniform_on_every_block_as_dinov2(tiny_config):
    cfg = tiny_config(**{"student.kwargs.depth": 4, "student.drop_path_rate": 0.4})
    assert drop_path_rates(build_backbone(cfg, 0.4).vit) == pytest.approx([0.4] * 4)
    ramp = tiny_config(**{"student.kwargs.depth": 4, "student.drop_path_uniform": False})
    assert drop_path_rates(build_backbone(ramp, 0.4).vit) == pytest.approx(
        np.linspace(0, 0.4, 4).tolist())


def test_layerscale_init_maps_to_timm_and_kwargs_init_values_is_refused(tiny_config):
    one = build_backbone(tiny_config(**{"student.layerscale_init": 1.0}), 0.0).vit
    assert torch.equal(one.blocks[0].ls1.gamma, torch.ones(48))
    default = build_backbone(tiny_config(**{"student.layerscale_init": None}), 0.0).vit
    assert torch.allclose(default.blocks[0].ls1.gamma, torch.full((48,), 1e-5))  # *_dinov2's
    none = build_backbone(tiny_config(**{"student.layerscale_init": 0.0}), 0.0).vit
    assert isinstance(none.blocks[0].ls1, nn.Identity)
    with pytest.raises(ConfigError, match="student.kwargs.init_values.*student.layerscale_init"):
        load_config(None, ["student.kwargs={init_values: 1.0}", "data.tiles=[/x]"])


def _meta(tiny_config, **dotted) -> DistillMetaArch:
    cfg = tiny_config(**dotted)
    expert = TimmExpert("vit_tiny_patch16_224", {"img_size": 48, "embed_dim": 32, "depth": 1,
                                                 "num_heads": 2})
    from napari_gpfm.distill.experts import ExpertWeights

    return cfg, DistillMetaArch(cfg, {"x": expert}, {"x": ExpertWeights(1.0, 0.5)})


def test_expert_heads_last_layers_are_frozen_with_the_prototypes(tiny_config):
    cfg, meta = _meta(tiny_config)
    names = {id(p): n for n, p in meta.student.named_parameters()}
    last = {names[id(p)] for g in param_groups(meta.student, cfg, 2) if g["is_last_layer"]
            for p in g["params"]}
    # DINOv2's get_params_groups_with_decay flags every parameter named "last_layer"
    assert last == {n for n in names.values() if "last_layer" in n}
    assert "expert_heads.x.last_layer.weight" in last and "expert_heads.x.last_layer.gain" in last
    cfg, meta = _meta(tiny_config, **{"experts.freeze_head_last_layer": False})
    last = {n for g in param_groups(meta.student, cfg, 2) if g["is_last_layer"]
            for n, p in meta.student.named_parameters() if any(p is q for q in g["params"])}
    assert not any(n.startswith("expert_heads") for n in last)


def test_gradients_clipped_per_module_and_expert_heads_unclipped(tiny_config):
    cfg, meta = _meta(tiny_config)
    torch.manual_seed(0)
    for p in meta.student.parameters():
        p.grad = torch.randn_like(p) * 10
    before = {n: p.grad.clone() for n, p in meta.student.named_parameters()}
    # DINOv2/GPFM: for v in model.student.values(): v.clip_grad_norm_(3.0); distill heads apart
    reference = {}
    for key, module in meta.student.items():
        grads = [before[f"{key}.{n}"].clone() for n, _ in module.named_parameters()]
        if key != "expert_heads":  # torch's clip_grad_norm_: coef = 3 / (norm + 1e-6), <= 1
            total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            grads = [g * min(1.0, 3.0 / (float(total) + 1e-6)) for g in grads]
        reference.update({f"{key}.{n}": g for (n, _), g in zip(module.named_parameters(), grads)})
    TrainingRun.clip_gradients(SimpleNamespace(cfg=cfg, meta=meta))
    for name, p in meta.student.named_parameters():
        assert torch.allclose(p.grad, reference[name], rtol=1e-5), name
    norm = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(p.grad) for p in meta.student["backbone"].parameters()
        if p.grad is not None]))
    assert norm == pytest.approx(3.0, rel=1e-4)
    assert torch.equal(meta.student["expert_heads"]["x"].proj.weight.grad,
                       before["expert_heads.x.proj.weight"])


def test_dino_without_local_crops_divides_by_three_as_dinov2():
    torch.manual_seed(0)
    s, t = torch.randn(8, 16), torch.softmax(torch.randn(8, 16), -1)
    # DINOv2: dino_loss([s], [swapped t]) * 2 / (n_global_terms 2 + max(n_local_terms 0, 1))
    lsm = F.log_softmax(s / 0.1, -1)
    swapped = torch.cat(t.chunk(2)[::-1])
    reference = -(swapped * lsm).sum(-1).mean() * 2 / 3
    got = DINOClsLoss(16, 0.1, 0.9)(s, None, t, n_global=2)
    assert torch.isclose(got, reference, rtol=1e-6)


def test_koleo_epsilon_inside_the_distance_as_dinov2():
    x = torch.randn(6, 8)
    x[3] = x[1]  # a duplicate: distance 0, where the epsilon's place matters
    xn = F.normalize(x, eps=1e-8, dim=-1)
    dots = xn @ xn.T
    dots.view(-1)[:: len(x) + 1] = -1
    # DINOv2: pdist = nn.PairwiseDistance(2, eps=1e-8) (eps added to the difference)
    reference = -torch.log(nn.PairwiseDistance(2, eps=1e-8)(xn, xn[dots.argmax(1)]) + 1e-8).mean()
    assert torch.isclose(KoLeoLoss()(x), reference, rtol=1e-6)


@pytest.mark.parametrize(("side", "dinov2_share"), [(3, 0.2130), (4, 0.2649)])
def test_masked_share_on_small_grids_as_dinov2(side, dinov2_share):
    """DINOv2's MaskingGenerator(max_num_patches=0.5 N) with targets int(N * U(0.1, 0.5)),
    20,000 draws (seed 0), masks 21.30 % of a 3x3 grid and 26.49 % of a 4x4 grid."""
    n = side * side
    generator, rng = BlockMaskGenerator((side, side)), np.random.default_rng(0)
    shares = [generator(int(n * rng.uniform(0.1, 0.5)), rng).sum() / n for _ in range(20000)]
    assert float(np.mean(shares)) == pytest.approx(dinov2_share, abs=0.006)


def test_expert_cls_kl_option_is_gpfms_kldiv():
    torch.manual_seed(0)
    s, t = torch.randn(5, 1, 32), torch.randn(5, 1, 32)  # GPFM: (B, 1, dim) CLS tokens
    # GPFM KLDiv(T=1): kl_div(log_softmax(s), softmax(t), reduction="batchmean")
    reference = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    assert torch.isclose(ExpertClsLoss("kl")(s[:, 0], t[:, 0]), reference, rtol=1e-6)
    cosine = 1 - F.cosine_similarity(s, t, dim=-1).mean()  # GPFM Cosine ("radio")
    assert torch.isclose(ExpertClsLoss("cosine")(s[:, 0], t[:, 0]), cosine, rtol=1e-6)


def test_sinkhorn_knopp_targets_as_dinov2():
    torch.manual_seed(0)
    logits, temp = torch.randn(12, 5), 0.07
    # DINOv2 sinkhorn_knopp_teacher, three iterations, one process
    q = torch.exp(logits / temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    reference = (q * b).t()
    got = sinkhorn_knopp(logits, temp)
    assert torch.allclose(got, reference, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got.sum(1), torch.ones(12), atol=1e-5)
    assert got.sum(0).std() < torch.softmax(logits / temp, -1).sum(0).std()  # balanced


def test_sinkhorn_knopp_option_runs_without_a_centre(tiny_config):
    cfg, meta = _meta(tiny_config, **{"teacher.centering": "sinkhorn_knopp"})
    logits = torch.randn(8, 64)
    probs = meta.losses["dino"].teacher_probs(logits, 0.04)
    meta.losses["dino"].update_center(logits)
    assert torch.allclose(probs, sinkhorn_knopp(logits, 0.04))
    assert torch.equal(meta.losses["dino"].center, torch.zeros(1, 64))


def test_conch_target_is_the_512d_normalised_pooled_embedding_at_crop_size():
    from napari_gpfm.distill.experts import RegistryExpert

    expert = RegistryExpert("conch", None, torch.device("cpu"), allow_random=True, seed=0)
    assert expert.cls_dim == 512 and expert.embed_dim == 768 and expert.input_size is None
    crops = torch.randn(2, 3, 224, 224)
    cls, patch = expert.tokens(crops)
    assert cls.shape == (2, 512) and patch.shape == (2, 14 * 14, 768)  # 224 px, not 448
    assert torch.allclose(cls.norm(dim=-1), torch.ones(2), atol=1e-5)
    model = expert.encoder.model  # GPFM: F.normalize(conch.visual(img)[0]) = the pooled token
    with torch.no_grad():
        assert torch.allclose(cls, model.forward_head(model.forward_features(crops)), atol=1e-6)
    trunk = RegistryExpert("conch", None, torch.device("cpu"), True, 0, cls_target="cls_token")
    assert trunk.cls_dim == 768
    assert math.isclose(float(trunk.tokens(crops)[0].shape[-1]), 768)


def test_prototype_gains_are_trained_as_dinov2s_weight_g(tiny_config):
    """DINOv2's (and GPFM's) DINOHead: ``weight_norm(Linear(bottleneck, K, bias=False))`` with
    ``weight_g`` filled with 1 and left trainable; ``get_params_groups_with_decay`` decays it
    (its name has no "bias", "norm" or "gamma") and freezes it with the last layer."""
    from napari_gpfm.distill.heads import DINOHead

    torch.manual_seed(0)
    ours = DINOHead(16, n_prototypes=12, hidden_dim=32, bottleneck_dim=8, n_layers=3)
    import warnings

    with warnings.catch_warnings():  # the parametrizations API names it differently
        warnings.simplefilter("ignore", FutureWarning)
        ref = nn.utils.weight_norm(nn.Linear(8, 12, bias=False))
    ref.weight_g.data.fill_(1)
    with torch.no_grad():
        ref.weight_v.copy_(ours.last_layer.weight)
        gains = torch.rand(12, 1) + 0.5  # after some training
        ref.weight_g.copy_(gains)
        ours.last_layer.gain.copy_(gains)
    x = torch.randn(5, 16)
    z = F.normalize(ours.mlp(x), dim=-1)
    torch.testing.assert_close(ours(x), ref(z), rtol=1e-5, atol=1e-6)
    assert ours.last_layer.gain.requires_grad and ours.last_layer.gain.shape == ref.weight_g.shape

    cfg, meta = _meta(tiny_config)
    assert cfg["dino"]["learn_prototype_gain"] is True  # the default: DINOv2's and GPFM's
    group = next(g for g in param_groups(meta.student, cfg, 2)
                 if any(p is meta.student["dino_head"].last_layer.gain for p in g["params"]))
    assert group["is_last_layer"] and group["wd_multiplier"] == 1.0
    cfg, meta = _meta(tiny_config, **{"dino.learn_prototype_gain": False})
    assert meta.student["dino_head"].last_layer.gain is None  # DINO v1's norm_last_layer
