"""Patch loading in worker processes, overlapping slide decoding with the model.

:class:`PatchDataset` is a torch ``Dataset`` over (slide path, mpp override, coords, level-0
size, output size). It opens the slide lazily, once per worker process, and returns
``(uint8 (out, out, 3) patch, index)``. :func:`make_loader` wraps it in a ``DataLoader``
(ordered, persistent workers, prefetch) and :func:`iter_batches` yields
``(uint8 (B, out, out, 3) tensor, int64 (B,) indices)`` batches in scan order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "BatchStream",
    "PatchDataset",
    "default_num_workers",
    "iter_batches",
    "make_loader",
    "open_for_reading",
]


def open_for_reading(path: str | Path, mpp: float | None = None) -> Any:
    """Default opener: :func:`napari_gpfm.slide.open_slide` (imported lazily, in the worker)."""
    from napari_gpfm.slide import open_slide

    return open_slide(path, mpp=mpp)


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: Loader processes on a GPU: enough decoders to feed a ViT-L at ~2,500 patches/s (a 224 px
#: read costs a few ms per core), leaving two cores to the main process and the pinning thread.
GPU_MAX_WORKERS = 16


def default_num_workers(device: Any = None) -> int:
    """Loader processes for a run on ``device``: on the CPU ``min(2, CPUs)`` (the model wants
    the cores); on CUDA ``CPUs - 2``, between 2 and :data:`GPU_MAX_WORKERS` (the GPU outruns
    any one decoder)."""
    cpus = available_cpus()
    if getattr(device, "type", str(device or "")).split(":")[0] == "cuda":
        return max(2, min(GPU_MAX_WORKERS, cpus - 2))
    return min(2, cpus)


class PatchDataset(Dataset):
    """Square level-0 patches of one slide, resized to ``out_size``.

    Args:
        slide_path: slide file; each worker process opens it once, on first use.
        coords: (N, 2) level-0 top-left ``x, y``.
        size0: patch side in level-0 pixels.
        out_size: side of the returned patch.
        mpp: mpp override passed to the opener (``None``: the file's).
        opener: ``opener(path, mpp) -> Slide``; must be picklable (a module-level function)
            when used with worker processes. Defaults to :func:`open_for_reading`.
        slide: an already open slide to use in the *main* process (``num_workers=0``); it is
            never pickled, workers reopen ``slide_path``.
    """

    def __init__(
        self,
        slide_path: str | Path,
        coords: np.ndarray,
        size0: int,
        out_size: int,
        mpp: float | None = None,
        opener: Callable[..., Any] | None = None,
        slide: Any | None = None,
    ) -> None:
        self.slide_path = str(slide_path)
        self.coords = np.ascontiguousarray(np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        self.size0 = int(size0)
        self.out_size = int(out_size)
        self.mpp = mpp
        self.opener = opener or open_for_reading
        self._slide = slide

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"] = None  # file handles never cross process boundaries
        return state

    @property
    def slide(self) -> Any:
        """The open slide (opened on first access in this process)."""
        if self._slide is None:
            self._slide = self.opener(self.slide_path, self.mpp)
        return self._slide

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        x, y = (int(v) for v in self.coords[i])
        patch = self.slide.read_patch(x, y, self.size0, self.out_size)
        patch = np.asarray(patch, dtype=np.uint8)
        if patch.shape != (self.out_size, self.out_size, 3):
            raise ValueError(
                f"{self.slide_path}: read_patch({x}, {y}, {self.size0}, {self.out_size}) returned "
                f"shape {patch.shape}, expected {(self.out_size, self.out_size, 3)}"
            )
        return patch, i


def _worker_init(_: int) -> None:
    # Each worker decodes with one thread; the model in the main process owns the cores.
    torch.set_num_threads(1)


def _collate(items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    patches = torch.from_numpy(np.stack([p for p, _ in items]))
    index = torch.as_tensor([i for _, i in items], dtype=torch.int64)
    return patches, index


def make_loader(
    dataset: PatchDataset,
    batch_size: int = 64,
    num_workers: int | None = None,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    persistent_workers: bool = True,
) -> DataLoader:
    """Ordered ``DataLoader`` over ``dataset``; each worker reads whole batches.

    ``num_workers=None`` uses :func:`default_num_workers`; ``0`` reads in the main process.
    """
    if num_workers is None:
        num_workers = default_num_workers()
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(
            persistent_workers=persistent_workers,
            prefetch_factor=max(1, prefetch_factor),
            worker_init_fn=_worker_init,
        )
    return DataLoader(
        dataset,
        batch_size=max(1, int(batch_size)),
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        drop_last=False,
        **kwargs,
    )


class BatchStream:
    """Ordered ``(uint8 (B, H, W, 3), int64 (B,))`` batches; worker processes start at once.

    Starting the workers eagerly lets callers fork them *before* opening files that children
    must not inherit (an HDF5 file's lock would outlive a killed parent in an orphan worker).
    ``close()`` (or ``with``) shuts the workers down.
    """

    def __init__(self, loader: DataLoader) -> None:
        self._loader: DataLoader | None = loader
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = iter(loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        it, self._it, self._loader = self._it, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def iter_batches(
    dataset: PatchDataset,
    batch_size: int = 64,
    num_workers: int | None = None,
    **loader_kwargs: Any,
) -> BatchStream:
    """:class:`BatchStream` over ``dataset`` (workers already started); in scan order."""
    loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers, **loader_kwargs)
    return BatchStream(loader)
