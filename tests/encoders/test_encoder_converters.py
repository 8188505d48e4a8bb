"""Expert checkpoints (UNI, Phikon, CONCH) on tiny synthetic state dicts with their real naming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomized
from layout_files import BASE_KW, CONCH_HEAD_KEYS, PIXELS, coca_checkpoint, expert_card, legacy_hf_vit

from napari_gpfm.encoders import CheckpointError, build_model, get_card, load_encoder
from napari_gpfm.encoders.checkpoint import convert_checkpoint

@pytest.fixture
def phikon_like(isolated_env: Path):
    expert_card(isolated_env, "tiny-phikon", "phikon",
                {"timm_name": "vit_base_patch16_224", "kwargs": BASE_KW, "norm_eps": 1e-12})
    card = get_card("tiny-phikon")
    return card, randomized(build_model(card), seed=5)


def test_phikon_legacy_keys_convert_exactly(phikon_like, tmp_path: Path):
    card, reference = phikon_like
    hf = legacy_hf_vit(reference.state_dict())
    converted = convert_checkpoint({f"vit.{k}": v for k, v in hf.items()}, "phikon", path="hf")
    assert set(converted) == set(reference.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in reference.state_dict().items())
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf, path)
    encoder = load_encoder(card, weights=path)
    expected = reference.forward_features(encoder.preprocess(PIXELS))[:, 0]
    torch.testing.assert_close(encoder.embed(PIXELS), expected, rtol=0, atol=0)


def test_phikon_incomplete_attention_names_file(phikon_like, tmp_path: Path):
    card, reference = phikon_like
    hf = legacy_hf_vit(reference.state_dict())
    del hf["encoder.layer.1.attention.attention.value.weight"]
    path = tmp_path / "cut.bin"
    torch.save(hf, path)
    with pytest.raises(CheckpointError, match="layer 1 has only") as info:
        load_encoder(card, weights=path)
    assert str(path) in str(info.value)


def test_phikon_matches_transformers_vitmodel(phikon_like, tmp_path: Path):
    """Semantics, not just names: our encoder's CLS equals ViTModel's last_hidden_state[:, 0]."""
    transformers = pytest.importorskip("transformers")
    card, _ = phikon_like
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, image_size=32, patch_size=16)
    hf_model = randomized(transformers.ViTModel(config), seed=9)
    path = tmp_path / "hf.bin"
    torch.save(hf_model.state_dict(), path)
    encoder = load_encoder(card, weights=path)
    pixels = encoder.preprocess(PIXELS)
    with torch.no_grad():
        expected = hf_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(encoder.embed(pixels), expected[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(encoder.tokens(pixels)[1], expected[:, 1:], rtol=1e-4, atol=1e-4)


def test_uni_flat_timm_checkpoint(isolated_env: Path, tmp_path: Path):
    kwargs = {**BASE_KW, "init_values": 1e-5, "dynamic_img_size": True}
    expert_card(isolated_env, "tiny-uni", "timm",
                {"timm_name": "vit_large_patch16_224", "kwargs": kwargs})
    card = get_card("tiny-uni")
    reference = randomized(build_model(card), seed=6)
    assert "blocks.1.ls2.gamma" in reference.state_dict()  # UNI's LayerScale keys
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference.state_dict(), path)
    encoder = load_encoder("tiny-uni", weights=path)
    expected = reference.forward_features(encoder.preprocess(PIXELS))[:, 0]
    torch.testing.assert_close(encoder.embed(PIXELS), expected, rtol=0, atol=0)


def test_conch_vision_tower_pooled_embedding(isolated_env: Path, tmp_path: Path):
    kwargs = {**BASE_KW, "dynamic_img_size": True}
    pool = {"type": "attentional", "dim": 16, "heads": 2, "project": True, "normalize": True}
    expert_card(isolated_env, "tiny-conch", "conch",
                {"timm_name": "vit_base_patch16_224", "kwargs": kwargs, "pool": pool}, embed_dim=16)
    card = get_card("tiny-conch")
    reference = randomized(build_model(card), seed=8)
    ckpt = coca_checkpoint(reference.state_dict())
    assert {k for k in ckpt if k.startswith("visual.") and ".trunk." not in k
            and "caption" not in k} == CONCH_HEAD_KEYS
    path = tmp_path / "pytorch_model.bin"
    torch.save(ckpt, path)
    encoder = load_encoder(card, weights=path)
    assert (encoder.embed_dim, encoder.token_dim) == (16, 32)
    pixels = encoder.preprocess(PIXELS)
    embedding = encoder.embed(pixels)
    assert embedding.shape == (2, 16)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))
    # by hand: LayerNorm'd tokens attended by the LayerNorm'd query, LayerNorm, projection, L2
    tokens = reference.trunk.forward_features(pixels)
    pooler = reference.attn_pool_contrast
    query = pooler.ln_q(pooler.query).expand(2, -1, -1)
    context = pooler.ln_k(tokens)
    pooled = pooler.attn(query, context, context)[0][:, 0]
    by_hand = torch.nn.functional.normalize(reference.ln_contrast(pooled) @ reference.proj_contrast,
                                            dim=-1)
    torch.testing.assert_close(embedding, by_hand)
    cls, patches = encoder.tokens(pixels)
    assert cls.shape == (2, 32) and patches.shape == (2, 4, 32)
