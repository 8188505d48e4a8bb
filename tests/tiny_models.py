"""Tiny stand-ins for models, shared by tests that need a fast encoder.

- `tiny_card`: a tiny random DINOv2-style ViT as a model card. Tests write it into a temporary
  folder named by ``NAPARI_GPFM_MODELS_DIR`` and load it with
  ``load_encoder(name, allow_random=True)``: 48-d, 2 blocks, 56 px input, patch 14.
- `layerscale_card`: the same kind of ViT as a card dict, 3 blocks with LayerScale 1 (so that
  random blocks matter), as PathoTune's tests need.
- `embed_sample`: a real feature store of a slide made with such a model.
- `FakeText`: a deterministic stand-in for PathoTune's MiniLM sentence encoder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def tiny_card(name: str = "tiny-test", patch_size: int = 112,
              display_name: str = "Tiny random ViT for tests") -> str:
    """The card's YAML; ``patch_size`` is the recommended tile side at 0.5 µm/px."""
    return f"""\
name: {name}
display_name: {display_name}
is_gpfm: false
architecture:
  timm_name: vit_small_patch14_dinov2
  kwargs: {{img_size: 56, embed_dim: 48, depth: 2, num_heads: 2, num_classes: 0}}
checkpoint_layout: timm
input: {{size: 56, interpolation: bicubic, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
embed_dim: 48
weights: {{file: null, env: null, default_path: null, hf_hub: null, url: null, sha256: null}}
license: Apache-2.0
gated: false
recommended_tiles: {{target_mpp: 0.5, patch_size: {patch_size}}}
provenance: {{}}
"""


def write_tiny_card(directory: Path, name: str = "tiny-test", patch_size: int = 112) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.yaml").write_text(tiny_card(name, patch_size))
    return directory


def layerscale_card(name: str, depth: int = 3) -> dict:
    """A tiny random DINOv2-style ViT card (48-d, ``depth`` blocks, 56 px; LayerScale 1, where
    timm's DINOv2 default 1e-5 would make random blocks invisible) whose recommended tiling is
    224 px at 0.5 µm/px."""
    return {
        "name": name, "display_name": name, "is_gpfm": False,
        "architecture": {"timm_name": "vit_small_patch14_dinov2",
                         "kwargs": {"img_size": 56, "embed_dim": 48, "depth": depth,
                                    "num_heads": 2, "num_classes": 0, "init_values": 1.0}},
        "checkpoint_layout": "timm",
        "input": {"size": 56, "interpolation": "bicubic",
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "embed_dim": 48,
        "weights": {"file": None, "env": None, "default_path": None, "hf_hub": None,
                    "url": None, "sha256": None},
        "license": "Apache-2.0", "gated": False,
        "recommended_tiles": {"target_mpp": 0.5, "patch_size": 224}, "provenance": {},
    }


def embed_sample(slide: Path, model: str, out_dir: Path):
    """A real feature store of ``slide`` made with the (registered) tiny random model ``model``
    at its recommended tiling, on one thread and without loader workers."""
    import torch

    from napari_gpfm.embeddings import embed, open_store
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.tiles import TissueParams

    torch.set_num_threads(1)
    enc = load_encoder(model, allow_random=True)
    path = embed(slide, enc, None, out_dir, tissue_params=TissueParams(thumbnail_max_side=512),
                 num_workers=0, batch_size=64)
    return open_store(path)


class FakeText:
    """Deterministic stand-in for MiniLM: a unit vector seeded by the sentence's hash."""

    name = "fake-text"
    dim = 384

    def encode(self, sentences):
        out = []
        for s in sentences:
            seed = int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)
