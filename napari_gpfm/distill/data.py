"""Step-indexed data order: which image and which augmentation seed every sample gets.

Sample ``i`` of micro-batch ``micro`` of optimiser step ``step`` on rank ``rank`` sits at global
position ``p = ((step · accum + micro) · world + rank) · batch + i`` of an endless stream; epoch
``p // n`` is a seeded permutation of the dataset, and the augmentation seed is derived from
``(seed, p)``. So data order and crops are a function of (seed, step, rank): a resumed run reads
exactly what an uninterrupted run would, and ranks shard each global batch like a
``DistributedSampler``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import MultiCropAugmentation
from .config import Config
from .masking import MultiCropCollate
from .sources import ImageSource

ORDER_STREAM = 0x6F726465  # "orde"
AUGMENT_STREAM = 0x61756720  # "aug "


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (NumPy SeedSequence mixing; stable across runs)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


@dataclass(frozen=True)
class DataLayout:
    """How optimiser steps map onto samples of the stream."""

    batch_size: int
    accumulation_steps: int
    world_size: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation_steps * self.world_size


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields micro-batches of ``(image index, augmentation seed)`` from ``start_step`` on."""

    def __init__(
        self, n_images: int, layout: DataLayout, seed: int, start_step: int, total_steps: int
    ) -> None:
        self.n_images, self.layout, self.seed = n_images, layout, seed
        self.start_step, self.total_steps = start_step, total_steps
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_images)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, ORDER_STREAM, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n_images)
        return int(self._order[offset])

    def micro_batch(self, step: int, micro: int) -> list[tuple[int, int]]:
        lay = self.layout
        micro_index = step * lay.accumulation_steps + micro
        first = (micro_index * lay.world_size + lay.rank) * lay.batch_size
        return [
            (self._index(p), derive_seed(self.seed, AUGMENT_STREAM, p))
            for p in range(first, first + lay.batch_size)
        ]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            for micro in range(self.layout.accumulation_steps):
                yield self.micro_batch(step, micro)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.layout.accumulation_steps


class MultiCropDataset(Dataset):
    """``(index, seed)`` -> multi-crop sample of image ``index`` augmented with ``seed``."""

    def __init__(self, source: ImageSource, augmentation: MultiCropAugmentation) -> None:
        self.source, self.augmentation = source, augmentation

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        image = torch.from_numpy(self.source.read(index)).permute(2, 0, 1).contiguous()
        generator = torch.Generator().manual_seed(seed)
        crops = self.augmentation(image, generator)
        return {**crops, "label": self.source.label(index), "seed": seed}


def build_loader(
    cfg: Config,
    source: ImageSource,
    patch_size: int,
    layout: DataLayout,
    start_step: int,
) -> DataLoader:
    """DataLoader over micro-batches from ``start_step`` to ``train.steps``."""
    sampler = StepBatchSampler(
        len(source), layout, cfg["train"]["seed"], start_step, cfg["train"]["steps"]
    )
    workers = int(cfg["data"]["num_workers"])
    return DataLoader(
        MultiCropDataset(source, MultiCropAugmentation(cfg, patch_size)),
        batch_sampler=sampler,
        collate_fn=MultiCropCollate(cfg, patch_size),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if workers else None,
        generator=torch.Generator(),  # keeps the global RNG untouched by iterator creation
    )
