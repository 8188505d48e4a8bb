"""The device side of an embed run: batch size from free memory, optional ``torch.compile``,
and a forward pass that keeps a GPU busy.

How a batch travels (see :func:`napari_gpfm.embeddings.embed_slide`): loader worker processes
decode patches to uint8; on CUDA the ``DataLoader`` copies each batch into pinned host memory;
:class:`BatchForward` sends the uint8 batch with a non-blocking copy (4× fewer bytes than fp32),
normalises it on the device, runs the network under the run's precision and starts a
non-blocking copy of the features back into pinned memory. The run collects a batch's features
only after the *next* batch has been launched (``depth=1``), so the host's work (writing the
store, taking the next batch from the loader, reporting progress) overlaps the GPU's instead of
stalling it. On the CPU the depth is 0: launching is computing.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_gpfm.encoders.device import autocast
from napari_gpfm.errors import NapariGpfmError

__all__ = [
    "AUTO_BATCH_CAP",
    "BatchForward",
    "CompileUnavailableWarning",
    "MEMORY_FRACTION",
    "auto_batch_size",
    "compile_available",
    "cpu_batch_size",
    "per_patch_bytes",
]

#: Largest automatic batch on a GPU: ViT-L/14 at 224 reaches its throughput plateau well below
#: it, and a batch is the cancel and store-chunk granularity.
AUTO_BATCH_CAP = 512
#: Share of the free device memory the automatic batch may use (the rest: the allocator's
#: fragmentation, cuDNN/cuBLAS workspaces, other processes' growth).
MEMORY_FRACTION = 0.6
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class CompileUnavailableWarning(UserWarning):
    """``compile=True`` was asked for but cannot be honoured here (the run goes on uncompiled;
    the message says why and how to enable it)."""


def _vit_geometry(model: Any, input_size: int) -> tuple[int, int, int, int]:
    """(tokens, width, heads, mlp hidden) of a timm ViT (or a pooled wrapper around one)."""
    trunk = getattr(model, "trunk", model)
    try:
        patch = trunk.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        tokens = (int(input_size) // int(patch)) ** 2 + int(getattr(trunk, "num_prefix_tokens", 1))
        width = int(trunk.embed_dim)
        block = trunk.blocks[0]
        heads = int(block.attn.num_heads)
        hidden = int(block.mlp.fc1.out_features)
    except (AttributeError, IndexError, TypeError) as exc:
        raise NapariGpfmError(
            f"cannot size an automatic batch for {type(trunk).__name__}: it is not a "
            f"ViT this estimate knows ({exc}); give a batch size (--batch-size N)"
        ) from exc
    return tokens, width, heads, hidden


def per_patch_bytes(model: Any, input_size: int, precision: str) -> int:
    """Device memory one patch needs during an inference forward, a stated over-estimate:

    ``2 × (tokens × (3·width + hidden + 2·width) × b + heads × tokens² × 4) + 5 × 3 × S²``

    — the activations alive in one transformer block (q, k, v; the MLP's hidden layer; the
    residual stream and its norm) at ``b`` bytes per element (2 under fp16/bf16 autocast, 4 in
    fp32), plus the attention scores in fp32 as the math kernel keeps them (the flash and
    memory-efficient kernels need none: counted anyway), doubled for the next block's buffers
    and allocator slack; plus the uint8 input and its fp32 normalised copy (S = input side).
    ViT-L/14 at 224 in fp16: ≈ 18.7 MB per patch.
    """
    tokens, width, heads, hidden = _vit_geometry(model, input_size)
    b = _BYTES[precision]
    act = tokens * (5 * width + hidden) * b
    attn = heads * tokens * tokens * 4
    return int(2 * (act + attn) + 5 * 3 * int(input_size) ** 2)


def cpu_batch_size(embed_dim: int) -> int:
    """CPU batches stay small so that Cancel is prompt (a batch is the cancel granularity):
    16 patches for models up to 512-d, 4 for wider (ViT-L: ~1 s per patch on 2 cores)."""
    return 16 if int(embed_dim) <= 512 else 4


def auto_batch_size(encoder: Any, device: torch.device, precision: str,
                    free_bytes: int | None = None, cap: int = AUTO_BATCH_CAP) -> int:  # fmt: skip
    """Batch size for ``--batch-size auto``.

    CUDA: ``MEMORY_FRACTION`` of the free memory (``torch.cuda.mem_get_info``, or
    ``free_bytes``) less the half-precision weight copies autocast keeps, divided by
    :func:`per_patch_bytes`; at most ``cap``, rounded down to a multiple of 8 (tensor-core
    friendly), at least 1. Elsewhere: :func:`cpu_batch_size`.
    """
    if device.type != "cuda" and free_bytes is None:
        return cpu_batch_size(int(encoder.embed_dim))
    model = encoder.model
    if free_bytes is None:
        free_bytes, _total = torch.cuda.mem_get_info(device)
    n_params = sum(p.numel() for p in model.parameters())
    weight_copies = n_params * 2 if precision in ("fp16", "bf16") else 0
    budget = MEMORY_FRACTION * float(free_bytes) - weight_copies
    per = per_patch_bytes(model, int(encoder.input_size), precision)
    n = int(min(cap, max(1.0, math.floor(budget / per))))
    return n - n % 8 if n >= 8 else n


def compile_available(device: torch.device) -> str | None:
    """``None`` when ``torch.compile`` (inductor) can run on ``device``, else why not."""
    if not hasattr(torch, "compile"):
        return f"this torch ({torch.__version__}) has no torch.compile"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "torch.utils._triton is missing from this torch build"
        if not has_triton():
            return ("Triton is not installed (inductor needs it on CUDA): "
                    "pip install triton, or run without --compile")  # fmt: skip
    return None


@contextlib.contextmanager
def strict_fp32(device: torch.device, precision: str):
    """fp32 on CUDA means fp32: TF32 (10-bit mantissa) matmuls and convolutions are switched off
    for the duration (cuDNN allows TF32 convolutions by default, which the patch embedding
    would use), and restored after. Other precisions and devices: unchanged."""
    if device.type != "cuda" or precision != "fp32":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv


@dataclass
class _Pending:
    out: torch.Tensor  # features on the host (pinned on CUDA), maybe still being copied
    event: Any  # torch.cuda.Event recorded after the copy, or None (already done)


class BatchForward:
    """uint8 (B, H, W, 3) batches → float32 (B, D) numpy features, ``depth`` batches in flight.

    ``submit(patches)`` launches a batch and returns the features of the batch submitted
    ``depth`` calls earlier (``None`` while the pipeline fills); ``drain()`` returns the rest,
    in order. ``depth=0`` is synchronous. With ``compiled=True`` the encoder's
    :meth:`~napari_gpfm.encoders.Encoder.embedding_module` runs through ``torch.compile``
    (``compile_backend``; a shorter last batch is padded to the compiled shape and cut back, so
    it is compiled once). Without, ``encoder.embed(encoder.preprocess(x))`` runs as is.
    """

    def __init__(self, encoder: Any, device: torch.device, precision: str, *,
                 depth: int | None = None, compiled: bool = False,
                 compile_backend: str = "inductor") -> None:  # fmt: skip
        self.encoder = encoder
        self.device = device
        self.precision = precision
        self.depth = (1 if device.type == "cuda" else 0) if depth is None else max(0, int(depth))
        self._queue: deque[_Pending] = deque()
        self._fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._shape: tuple[int, ...] | None = None
        self.compiled = False
        if compiled:
            why = compile_available(device)
            if why is not None:
                warnings.warn(f"--compile is off: {why}", CompileUnavailableWarning, stacklevel=2)
            else:
                module = getattr(encoder, "embedding_module", None)
                if module is None:
                    raise NapariGpfmError(
                        f"cannot compile {type(encoder).__name__}: it has no embedding_module()"
                    )
                self._fn = torch.compile(module(), backend=compile_backend, dynamic=False)
                self.compiled = True

    def _launch(self, patches: torch.Tensor) -> _Pending:
        dev = self.device
        with torch.inference_mode(), strict_fp32(dev, self.precision):
            x = patches.to(dev, non_blocking=True)
            n = int(x.shape[0])
            with autocast(dev, precision=self.precision):
                if self._fn is not None:
                    if self._shape is None:
                        self._shape = tuple(x.shape)
                    if tuple(x.shape) != self._shape and n < self._shape[0]:
                        pad = x.new_zeros((self._shape[0] - n, *x.shape[1:]))
                        x = torch.cat([x, pad])
                    f = self._fn(x)[:n]
                else:
                    f = self.encoder.embed(self.encoder.preprocess(x))
            f = f.float()
            if dev.type == "cuda":
                out = torch.empty(f.shape, dtype=torch.float32, pin_memory=True)
                out.copy_(f, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(dev))
                return _Pending(out, event)
            return _Pending(f.detach().to("cpu"), None)

    @staticmethod
    def _collect(p: _Pending) -> np.ndarray:
        if p.event is not None:
            p.event.synchronize()
        return p.out.numpy()

    def submit(self, patches: torch.Tensor) -> np.ndarray | None:
        self._queue.append(self._launch(patches))
        if len(self._queue) > self.depth:
            return self._collect(self._queue.popleft())
        return None

    def drain(self) -> list[np.ndarray]:
        out = [self._collect(p) for p in self._queue]
        self._queue.clear()
        return out

    def discard(self) -> None:
        """Drop batches in flight (a cancelled run: they are recomputed on resume)."""
        self._queue.clear()
