"""Shared fixtures: a tiny ViT/14 config over the 32 real H&E tiles, run in tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from napari_gpfm.distill.config import Config, load_config, merge, nest_dotted

# shared/ sits beside the repository (see ../shared/data/SOURCES.md)
TILES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tiles" / "crc-he" / "CRC-VAL-HE-7K"

TINY: dict[str, Any] = {
    "student": {
        "arch": "vit_small_patch14_dinov2",
        "kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 2},
        "drop_path_rate": 0.1,
    },
    "teacher": {"warmup_temp_steps": 0},
    "dino": {"n_prototypes": 64, "hidden_dim": 64, "bottleneck_dim": 32},
    "crops": {"global_size": 56, "local_size": 28, "local_number": 2},
    "optim": {"lr": 1.0e-3, "lr_scaling": "none"},
    "schedules": {"warmup_steps": 2, "freeze_last_layer_steps": 1},
    "train": {"steps": 6, "batch_size": 4, "precision": "fp32", "progress": False,
              "tensorboard": False, "checkpoint_every": 1000},
    "data": {"tiles": [str(TILES)], "num_workers": 0},
}


def _maker(root: Path):
    if not TILES.is_dir():
        pytest.skip(f"real H&E tiles not found at {TILES}")

    def make(subdir: str = "run", **dotted: Any) -> Config:
        cfg = load_config(None, TINY)
        paths = {"output.dir": str(root / subdir), "output.models_dir": str(root / "models")}
        return merge(cfg, nest_dotted({**paths, **dotted}))

    return make


@pytest.fixture
def tiny_config(tmp_path: Path):
    """``tiny_config(**{"train.steps": 20})`` -> merged config writing under tmp_path."""
    return _maker(tmp_path)


@pytest.fixture(scope="module")
def tiny_config_module(tmp_path_factory):
    """:func:`tiny_config` for module-scoped fixtures (e.g. one uninterrupted reference run)."""
    return _maker(tmp_path_factory.mktemp("distill"))
