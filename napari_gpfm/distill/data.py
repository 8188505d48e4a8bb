"""Step-indexed data order: which image and which augmentation seed every sample gets.

Sample ``i`` of micro-batch ``micro`` of optimiser step ``step`` on rank ``rank`` sits at global
position ``p = ((step · accum + micro) · world + rank) · batch + i`` of an endless stream; epoch
``p // n`` is a seeded permutation of the dataset, and the augmentation seed is derived from
``(seed, p)``. So data order and crops are a function of (seed, step, rank): a resumed run reads
exactly what an uninterrupted run would, and ranks shard each global batch like a
``DistributedSampler``.

Slide patches can be read at several resolutions and positions (``data.multi_mpp``,
``data.random_position``; off unless set): each tissue cell of the ``data.target_mpp`` grid is
then read, per sample, around a random point of the cell, at a random one of the listed mpp
(a coarser mpp reads a wider field around the cell, resized to ``data.patch_size``), so
crops come from every tissue position at several scales, and a resumed run still reads the same
pixels (the draw comes from the sample's seed).
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
from .sources import ConcatSource, ImageSource, SlidePatchSource

ORDER_STREAM = 0x6F726465  # "orde"
AUGMENT_STREAM = 0x61756720  # "aug "
POSITION_STREAM = 0x706F7320  # "pos ": where and at which mpp a slide patch is read


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


@dataclass(frozen=True)
class SlideSampling:
    """How slide patches are read: zoom factors relative to the grid's mpp (1 = the grid's
    own), and whether the read window is moved to a random point of its cell."""

    zooms: tuple[float, ...] = (1.0,)
    random_position: bool = False

    @property
    def active(self) -> bool:
        return self.random_position or self.zooms != (1.0,)

    @classmethod
    def from_config(cls, cfg: Config) -> SlideSampling:
        data = cfg["data"]
        mpps = list(data.get("multi_mpp") or [])
        if any(not isinstance(m, (int, float)) or isinstance(m, bool) or m <= 0 for m in mpps):
            raise ValueError(f"data.multi_mpp = {mpps!r}: expected a list of mpp > 0")
        zooms = tuple(float(m) / float(data["target_mpp"]) for m in mpps) or (1.0,)
        return cls(zooms, bool(data.get("random_position", False)))


def slide_part(source: ImageSource, index: int) -> tuple[SlidePatchSource, int] | None:
    """``(slide source, its index)`` when image ``index`` is a slide patch, else None."""
    if isinstance(source, SlidePatchSource):
        return source, index
    if isinstance(source, ConcatSource):
        inner, local = source._locate(index)
        return slide_part(inner, local)
    return None


def read_slide_window(
    source: SlidePatchSource, index: int, sampling: SlideSampling, g: torch.Generator
) -> np.ndarray:
    """Cell ``index`` of ``source`` read at a random zoom of ``sampling.zooms`` and, with
    ``random_position``, centred on a random point of the cell; the window stays inside the
    slide. uint8 (patch_size, patch_size, 3)."""
    slide_id, x, y = (int(v) for v in source.index[index])
    size0 = source.size0[slide_id]
    zoom = sampling.zooms[int(torch.randint(len(sampling.zooms), (), generator=g))]
    cx, cy = x + size0 / 2, y + size0 / 2
    if sampling.random_position:
        cx += (float(torch.rand((), generator=g)) - 0.5) * size0
        cy += (float(torch.rand((), generator=g)) - 0.5) * size0
    if slide_id not in source._open:
        from napari_gpfm.slide import open_slide

        source._open[slide_id] = open_slide(source.paths[slide_id], mpp=source.mpp)
    slide = source._open[slide_id]
    width, height = slide.dimensions
    side0 = max(1, round(size0 * zoom))
    left = int(min(max(round(cx - side0 / 2), 0), max(width - side0, 0)))
    top = int(min(max(round(cy - side0 / 2), 0), max(height - side0, 0)))
    patch = slide.read_patch(left, top, side0, source.out_size)
    return np.require(np.asarray(patch)[..., :3], np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])


class MultiCropDataset(Dataset):
    """``(index, seed)`` -> multi-crop sample of image ``index`` augmented with ``seed``."""

    def __init__(
        self, source: ImageSource, augmentation: MultiCropAugmentation,
        sampling: SlideSampling | None = None,
    ) -> None:
        self.source, self.augmentation = source, augmentation
        self.sampling = sampling or SlideSampling()

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int, seed: int) -> np.ndarray:
        """Image ``index`` as the sample with ``seed`` sees it (uint8 (H, W, 3))."""
        part = slide_part(self.source, index) if self.sampling.active else None
        if part is None:
            return self.source.read(index)
        g = torch.Generator().manual_seed(derive_seed(seed, POSITION_STREAM))
        return read_slide_window(*part, self.sampling, g)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        image = torch.from_numpy(self.read(index, seed)).permute(2, 0, 1).contiguous()
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
        MultiCropDataset(
            source, MultiCropAugmentation(cfg, patch_size), SlideSampling.from_config(cfg)
        ),
        batch_sampler=sampler,
        collate_fn=MultiCropCollate(cfg, patch_size),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if workers else None,
        generator=torch.Generator(),  # keeps the global RNG untouched by iterator creation
    )
