"""Background jobs of the GPFM docks: plain generators/functions run by napari's thread workers.

The job bodies never touch layers or widgets; their results reach the main thread through the
worker's ``yielded``/``returned`` signals. Cancelling is cooperative: superqt checks the abort
flag before each ``next()``, i.e. after every embedding batch, and :class:`ClosingGeneratorWorker`
then *closes* the generator in the worker thread, so ``embed_slide``'s cleanup (loader workers
stopped, store flushed as a resumable ``.partial``) runs at once instead of at garbage collection.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari.qt.threading import FunctionWorker, GeneratorWorker, create_worker

__all__ = [
    "ClosingGeneratorWorker",
    "avoid_llvm_clash",
    "EmbedJob",
    "EmbedResult",
    "StoreLoaded",
    "embed_job",
    "start_embed_worker",
    "start_function_worker",
]

#: Encoders built in this session, by (model, device, allow_random): a second run reuses one.
_ENCODERS: dict[tuple[str, str, bool], Any] = {}


def avoid_llvm_clash() -> bool:
    """Keep Triton and Mesa's LLVM from clashing; returns True when Triton was blocked.

    With a software (llvmpipe) or Mesa/AMD OpenGL driver the process holds Mesa's libLLVM
    once napari has drawn; importing Triton *after* that (torch imports it lazily, e.g. via
    torchvision or ``torch._dynamo`` when timm builds a model) loads a second LLVM and
    segfaults, while the other order is fine. So: when libLLVM is already mapped, ``import
    triton`` is made to fail cleanly (torch treats it as absent; eager inference never needs
    it); otherwise Triton, if installed, is imported now, before any GL context draws.
    """
    import importlib.util

    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            llvm = any("libLLVM" in line for line in fh)
    except OSError:  # not Linux
        return False
    if not llvm:
        if importlib.util.find_spec("triton") is not None:
            try:
                import triton  # noqa: F401
            except Exception:  # a broken Triton install: torch will treat it as absent too
                sys.modules["triton"] = None  # type: ignore[assignment]
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    warnings.warn(
        "napari-gpfm: the OpenGL driver loaded LLVM, so Triton (torch.compile kernels) is "
        "disabled in this napari session to avoid a crash; embeddings run in eager mode.",
        RuntimeWarning,
        stacklevel=2,
    )
    return True


class ClosingGeneratorWorker(GeneratorWorker):
    """A generator worker that closes its generator in the worker thread when it stops."""

    def work(self):
        try:
            return super().work()
        finally:
            self._gen.close()


@dataclass(frozen=True)
class EmbedJob:
    """Everything an embed run needs, gathered by the dock on the main thread."""

    slide: Any
    model: str
    spec: Any
    tissue_params: Any
    out_dir: Path
    device: str = "auto"
    allow_random: bool = False
    batch_size: int | None = None
    num_workers: int | None = None


@dataclass(frozen=True)
class StoreLoaded:
    """Yielded when a finished store with the same recipe already existed (no model loaded)."""

    path: Path


@dataclass(frozen=True)
class EmbedResult:
    """Returned by :func:`embed_job`: the finished store with its features read and the
    similarity index built, so the main thread has nothing heavy left to do."""

    store: Any
    index: Any


def batch_size_for(card: Any, device: str) -> int:
    """Small CPU batches keep Cancel prompt (the abort check runs between batches)."""
    if device.startswith("cuda"):
        return 64
    return 16 if card.embed_dim <= 512 else 4


def _encoder(job: EmbedJob, dev: str) -> Any:
    from ..encoders import load_encoder

    key = (job.model, dev, job.allow_random)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_encoder(job.model, device=dev, allow_random=job.allow_random)
    return _ENCODERS[key]


def embed_job(job: EmbedJob):
    """Generator: yields :class:`StoreLoaded` or ``EmbedProgress`` records; returns an
    :class:`EmbedResult`. Closing it cancels the run and leaves a resumable store."""
    from ..embeddings import embed_slide, resolve_device
    from ..encoders import get_card
    from ..layers.session import find_finished_store

    card = get_card(job.model)
    job.slide.require_mpp()
    store = find_finished_store(job.slide, card, job.spec, job.tissue_params, job.out_dir,
                                job.allow_random)  # fmt: skip
    if store is not None:
        yield StoreLoaded(store.path)
        return _loaded(store)
    dev = str(resolve_device(job.device))
    encoder = _encoder(job, dev)
    gen = embed_slide(
        job.slide, encoder, job.spec, job.out_dir,
        tissue_params=job.tissue_params,
        batch_size=job.batch_size or batch_size_for(card, dev),
        num_workers=job.num_workers,
        device=dev,
    )  # fmt: skip
    try:
        path = yield from gen
    finally:
        gen.close()
    from ..embeddings import open_store

    return _loaded(open_store(path))


def _loaded(store: Any) -> EmbedResult:
    from ..analyses.similarity import SimilarityIndex

    return EmbedResult(store, SimilarityIndex(store.features, model=store.model,
                                              name=store.slide_name))  # fmt: skip


def start_embed_worker(job: EmbedJob, **connections: Any) -> ClosingGeneratorWorker:
    """A started worker over :func:`embed_job`; ``connections`` map signal names to slots."""
    worker = create_worker(
        embed_job, job, _worker_class=ClosingGeneratorWorker, _start_thread=False,
        _connect=connections,
    )  # fmt: skip
    worker.start()
    return worker


def start_function_worker(func, *args: Any, **connections: Any) -> FunctionWorker:
    """Run ``func(*args)`` in a thread; ``connections`` map signal names to main-thread slots."""
    worker = create_worker(func, *args, _start_thread=False, _connect=connections)
    worker.start()
    return worker
