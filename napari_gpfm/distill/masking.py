"""iBOT block masking and the multi-crop collate that precomputes mask indices and weights.

Block masking follows BEiT/iBOT (as used by DINOv2): rectangles of random area and log-uniform
aspect ratio are added until the target number of patches is masked. A share
(``ibot.mask_sample_probability``) of the global crops in a batch gets a mask, with target ratios
spread evenly over ``ibot.mask_ratio_min_max``; the rest stay unmasked. All randomness comes from a
``numpy.random.Generator`` seeded from the batch's sample seeds, never from global state.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .config import Config

MIN_BLOCK_PATCHES = 4
BLOCK_ASPECT = (0.3, 1 / 0.3)
BLOCK_ATTEMPTS = 10
N_GLOBAL_CROPS = 2
MASK_STREAM = 0x6D61736B  # "mask": keeps mask draws independent of augmentation draws


class BlockMaskGenerator:
    """Boolean (h, w) masks made of rectangular blocks covering about ``n_masked`` patches."""

    def __init__(self, grid: tuple[int, int], min_block_patches: int = MIN_BLOCK_PATCHES) -> None:
        self.height, self.width = grid
        self.min_block_patches = min_block_patches
        self.log_aspect = (math.log(BLOCK_ASPECT[0]), math.log(BLOCK_ASPECT[1]))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Mask one block of at most ``budget`` new patches; return how many were added."""
        for _ in range(BLOCK_ATTEMPTS):
            # DINOv2 draws uniform(min_block, budget) even when the budget is smaller (then a
            # block of <= 4 patches still fits; on 4x4 grids this keeps its ~49 % share)
            lo, hi = sorted((self.min_block_patches, budget))
            area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_masked:
            added = self._add_block(mask, n_masked - count, rng)
            if added == 0:
                break
            count += added
        return mask


class MultiCropCollate:
    """Samples ``{"global", "local", "label", "seed"}`` -> the batch tensors the model needs.

    Output keys: ``global_crops`` (2B, 3, G, G) ordered [all first crops, all second crops],
    ``local_crops`` (nB, 3, L, L), ``labels`` (2B,), ``masks`` (2B, N) bool, ``mask_indices``
    (M,) into the flattened (2B·N) patch tokens and ``mask_weights`` (M,) = 1 / masked tokens of
    the token's image, so every masked image weighs the same in the iBOT loss.
    """

    def __init__(self, cfg: Config, patch_size: int) -> None:
        side = cfg["crops"]["global_size"] // patch_size
        self.n_tokens = side * side
        self.generator = BlockMaskGenerator((side, side))
        ibot = cfg["ibot"]
        self.mask_probability = ibot["mask_sample_probability"] if ibot["weight"] > 0 else 0.0
        self.ratio_min, self.ratio_max = ibot["mask_ratio_min_max"]

    def make_masks(self, n_images: int, rng: np.random.Generator) -> torch.Tensor:
        """(n_images, N) masks: the first share masked with spread ratios, then shuffled."""
        n_masked_images = int(n_images * self.mask_probability)
        bounds = np.linspace(self.ratio_min, self.ratio_max, n_masked_images + 1)
        masks = np.zeros((n_images, self.n_tokens), dtype=bool)
        for i in range(n_masked_images):
            target = int(self.n_tokens * rng.uniform(bounds[i], bounds[i + 1]))
            masks[i] = self.generator(target, rng).reshape(-1)
        return torch.from_numpy(masks[rng.permutation(n_images)])

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n_local = len(samples[0]["local"])
        global_crops = torch.stack([s["global"][v] for v in range(N_GLOBAL_CROPS) for s in samples])
        if n_local:
            local_crops = torch.stack([s["local"][v] for v in range(n_local) for s in samples])
        else:
            local_crops = global_crops.new_zeros((0, *global_crops.shape[1:]))
        labels = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        rng = np.random.default_rng([samples[0]["seed"], MASK_STREAM])
        masks = self.make_masks(len(global_crops), rng)
        weights = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "labels": labels.repeat(N_GLOBAL_CROPS),
            "masks": masks,
            "mask_indices": masks.flatten().nonzero().flatten(),
            "mask_weights": weights[masks].float(),
        }
