"""Fixtures for the encoder tests: an isolated home and models dir, and tiny DINOv2-style ViTs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from napari_gpfm.encoders import ModelCard, build_model, get_card

WEIGHT_ENVS = ("GPFM_WEIGHTS", "UNI_WEIGHTS", "PHIKON_WEIGHTS", "CONCH_WEIGHTS", "TINY_WEIGHTS")
TINY_ARCH = {
    "timm_name": "vit_small_patch14_dinov2",
    "kwargs": {"img_size": 56, "embed_dim": 48, "depth": 4, "num_heads": 2,
               "init_values": 1.0e-5, "num_classes": 0},
}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $HOME (so ~/.cache default paths are empty), user models dir, no weight env vars,
    Hugging Face offline. Returns the user models dir."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    models = tmp_path / "user-models"
    models.mkdir()
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(models))
    for var in WEIGHT_ENVS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    return models


def card_dict(name: str = "tiny", **overrides) -> dict:
    """A valid card for the tiny ViT; ``overrides`` replace top-level keys."""
    data = {
        "name": name,
        "display_name": f"{name} test ViT",
        "is_gpfm": True,
        "architecture": TINY_ARCH,
        "checkpoint_layout": "gpfm",
        "input": {"size": 56, "interpolation": "bicubic",
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "embed_dim": 48,
        "weights": {"file": None, "env": "TINY_WEIGHTS",
                    "default_path": f"~/.cache/napari-gpfm/weights/{name}.pth",
                    "hf_hub": {"repo_id": "example/tiny", "filename": f"{name}.pth"},
                    "url": None, "sha256": None},
        "license": "test-licence-1.0",
        "gated": False,
        "recommended_tiles": {"target_mpp": 0.5, "patch_size": 56},
        "provenance": {"note": "unit test"},
    }
    data.update(overrides)
    return data


def write_card(directory: Path, data: dict, filename: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (filename or f"{data['name']}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def tiny_card(isolated_env: Path) -> ModelCard:
    """The tiny card, installed in the user models dir."""
    write_card(isolated_env, card_dict())
    return get_card("tiny")


def gpfm_release(flat: dict, chunks: int, global_inner_index: bool) -> dict:
    """GPFM's GitHub-release layout: ``{'teacher': ...}`` with ``backbone.`` and FSDP chunks.
    DINOv2 numbers blocks globally inside each chunk; other trainers restart at 0."""
    depth = 1 + max(int(k.split(".")[1]) for k in flat if k.startswith("blocks."))
    per_chunk = depth // chunks
    teacher = {"backbone.mask_token": torch.zeros(1, 48)}
    for key, value in flat.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            chunk, inner = divmod(int(index), per_chunk)
            inner = int(index) if global_inner_index else inner
            key = f"blocks.{chunk}.{inner}.{rest}"
        teacher[f"backbone.{key}"] = value
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, 48)
    teacher["dino_head.last_layer.weight_g"] = torch.zeros(16, 1)
    teacher["ibot_head.mlp.0.weight"] = torch.zeros(8, 48)
    return {"teacher": teacher}


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter redrawn at a scale where each block, norm and LayerScale matters (timm's
    1e-5 LayerScale init would make the blocks nearly invisible in the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture
def tiny_model(tiny_card: ModelCard) -> torch.nn.Module:
    """A randomised tiny ViT matching ``tiny_card`` (the reference network)."""
    return randomized(build_model(tiny_card), seed=1)


@pytest.fixture
def images() -> torch.Tensor:
    """Two 56x56 uint8 RGB images (N, H, W, 3)."""
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (2, 56, 56, 3), generator=gen, dtype=torch.uint8)
