"""A tiny random DINOv2-style ViT as a model card, shared by tests that need a fast encoder.

Tests write the card into a temporary folder named by ``NAPARI_GPFM_MODELS_DIR`` and load it with
``load_encoder(name, allow_random=True)``: 48-d, 2 blocks, 56 px input, patch 14.
"""

from __future__ import annotations

from pathlib import Path


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
