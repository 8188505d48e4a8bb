"""Export a trained student as a registry model: timm-layout safetensors + model card YAML.

The exported network is the EMA teacher's backbone (the better of the two, as in DINOv2/GPFM)
with timm's flat keys, so the card's ``architecture`` rebuilds it with ``timm.create_model`` and
``checkpoint_layout: timm`` loads it strictly. Files land in the user models directory, which
the encoder registry reads after the bundled cards.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from .backbone import export_kwargs
from .config import Config, config_hash
from .meta_arch import DistillMetaArch

MODELS_DIR_ENV = "NAPARI_GPFM_MODELS_DIR"
DEFAULT_MODELS_DIR = Path("~/.local/share/napari-gpfm/models")
HASH_CHUNK = 1 << 20


def models_dir(cfg: Config) -> Path:
    """``output.models_dir``, else ``$NAPARI_GPFM_MODELS_DIR``, else the per-user default."""
    chosen = cfg["output"]["models_dir"] or os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR
    return Path(chosen).expanduser()


def model_name(cfg: Config) -> str:
    """``output.model_name`` (lower-cased) or ``gpfm-student-<config hash prefix>``."""
    return (cfg["output"]["model_name"] or f"gpfm-student-{config_hash(cfg)[:8]}").lower()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_student(
    meta: DistillMetaArch, cfg: Config, provenance: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``<name>.safetensors`` and ``<name>.yaml``; return (card path, weights path)."""
    name, directory = model_name(cfg), models_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if cfg["output"]["export_fp16"] else torch.float32
    backbone = meta.teacher["backbone"]
    state = {
        k: v.detach().to("cpu", dtype).contiguous() for k, v in backbone.vit.state_dict().items()
    }
    weights_path = directory / f"{name}.safetensors"
    save_file(state, weights_path, metadata={"format": "pt", "layout": "timm"})
    crops = cfg["crops"]
    card = {
        "name": name,
        "display_name": f"{name} (distilled {cfg['student']['arch']})",
        "is_gpfm": False,
        "architecture": {"timm_name": cfg["student"]["arch"], "kwargs": export_kwargs(cfg)},
        "checkpoint_layout": "timm",
        "input": {
            "size": crops["global_size"],
            "interpolation": "bicubic",
            "mean": list(crops["mean"]),
            "std": list(crops["std"]),
        },
        "embed_dim": backbone.embed_dim,
        "weights": {
            "file": weights_path.name,
            "env": None,
            "default_path": None,
            "hf_hub": None,
            "url": None,
            "sha256": sha256_file(weights_path),
        },
        "license": cfg["output"]["license"],
        "gated": False,
        # the tiles the student learned from: data.patch_size px read at data.target_mpp (its
        # global crops cover part of them, resized to the input size), as GPFM's card says
        # 512 px at 0.25 µm/px for its 224 px input
        "recommended_tiles": {
            "target_mpp": cfg["data"]["target_mpp"], "patch_size": cfg["data"]["patch_size"]
        },
        "provenance": {**provenance, "config_sha256": config_hash(cfg)},
    }
    card_path = directory / f"{name}.yaml"
    card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    return card_path, weights_path
