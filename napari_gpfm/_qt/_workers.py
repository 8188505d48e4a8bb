"""Thread workers for the docks, and the Triton/LLVM guard.

The job bodies live in :mod:`napari_gpfm.jobs` and never touch layers or widgets; their
records reach the main thread through the worker's ``yielded``/``returned`` signals.
Cancelling is cooperative: superqt checks the abort flag before each ``next()``, and
:class:`ClosingGeneratorWorker` then *closes* the generator in the worker thread, so a job's
cleanup (loader workers stopped, store flushed as a resumable ``.partial``) runs at once instead
of at garbage collection.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from napari.qt.threading import FunctionWorker, GeneratorWorker, create_worker

__all__ = ["ClosingGeneratorWorker", "avoid_llvm_clash", "start_function_worker"]


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


def start_function_worker(func, *args: Any, **connections: Any) -> FunctionWorker:
    """Run ``func(*args)`` in a thread; ``connections`` map signal names to main-thread slots."""
    worker = create_worker(func, *args, _start_thread=False, _connect=connections)
    worker.start()
    return worker
