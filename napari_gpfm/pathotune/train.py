"""Training PathoTune on labelled patches: a generator yielding progress records.

Recipe: stratified validation split (``val_fraction`` of every class with at least two
patches), class-balanced cross-entropy, AdamW (no weight decay on prompt tokens, queries,
norms and biases), linear warm-up then cosine decay per step, early stopping on validation
balanced accuracy (ties: lower validation loss) with the best epoch's weights restored, and
bf16/fp16 autocast on CUDA only (CPU trains in fp32); device and precision come from
:mod:`napari_gpfm.encoders.device`, the one place every job resolves them.

Augmentation is pathology-safe: the eight dihedral symmetries of a square (random 90° rotation
and flip; tissue has no up or left) and mild colour jitter (brightness, contrast and saturation
factors in ``1 ± colour_jitter``, default 0.1), applied per image in the normalised space of the
encoder's preprocessing. No crops or scale changes: the patch's physical size is part of the
recipe.

Cancelling: every step is a yield (closing the generator stops there), and a ``stop_event``
(``threading.Event``) is checked before every step; either way at most one step runs after the
request. A cancelled run restores the best weights seen so far and returns with
``cancelled=True``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from napari_gpfm.encoders.device import autocast, autocast_dtype, resolve_device

from napari_gpfm.analyses.probe import balanced_accuracy
from .model import PathoTuneClassifier, PromptConfig, build_classifier
from .text import TextEncoder, TextTemplate

__all__ = [
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "augment_batch",
    "balanced_accuracy",
    "encode_labels",
    "read_patches",
    "run",
    "stratified_split",
    "train_classifier",
    "train_from_arrays",
    "train_from_slide",
]

T = TypeVar("T")
_NO_DECAY = ("prompts", "queries", "bias", "norm")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (see module docstring)."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    val_fraction: float = 0.2
    patience: int = 8
    seed: int = 0
    augment: bool = True
    colour_jitter: float = 0.1
    device: str = "auto"
    amp: bool = True
    eval_batch_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainProgress:
    """One progress record.

    status: ``"reading"`` (labelled patches being read; ``step``/``total_steps`` count patches),
    ``"step"`` (after an optimiser step), ``"epoch"`` (after validation), then one of
    ``"done"``, ``"stopped-early"`` or ``"cancelled"``. ``val_*`` are ``None`` without a
    validation split; ``rate`` is training patches per second.
    """

    status: str
    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float | None = None
    train_acc: float | None = None
    val_bal_acc: float | None = None
    val_loss: float | None = None
    best_val_bal_acc: float | None = None
    best_epoch: int | None = None
    lr: float | None = None
    rate: float | None = None
    elapsed_s: float = 0.0
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 1.0


@dataclass
class TrainResult:
    """What training returns (the generator's return value)."""

    classifier: PathoTuneClassifier
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    val_bal_acc: float | None = None
    train_indices: np.ndarray | None = None
    val_indices: np.ndarray | None = None
    cancelled: bool = False
    stopped_early: bool = False
    train_patches_per_s: float = 0.0
    elapsed_s: float = 0.0


def run(gen: Generator[Any, None, T], on_progress: Any = None) -> T:
    """Drive a progress generator to its end and return its value (``on_progress(record)``)."""
    while True:
        try:
            record = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(record)


def encode_labels(labels: Sequence[Any] | np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Class indices (int64, -1 = unlabelled) from indices or class names (None/"" = -1)."""
    arr = np.asarray(labels, dtype=object).reshape(-1)
    names = list(class_names)
    out = np.full(arr.shape[0], -1, dtype=np.int64)
    for i, v in enumerate(arr):
        if v is None or (isinstance(v, str) and not v):
            continue
        if isinstance(v, str):
            if v not in names:
                raise ValueError(f"label {v!r} is not one of the classes {names}")
            out[i] = names.index(v)
        else:
            out[i] = int(v)
    if out.max(initial=-1) >= len(names) or out.min(initial=-1) < -1:
        raise ValueError(f"label indices must be in [-1, {len(names) - 1}]")
    return out


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of the labelled (``>= 0``) entries: ``round(val_fraction·n)``
    of every class, at least one for classes with two or more patches, never all of a class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = 0
        if val_fraction > 0 and idx.size >= 2:
            n_val = int(min(max(round(val_fraction * idx.size), 1), idx.size - 1))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

    return cat(train), cat(val)


def augment_batch(
    x: torch.Tensor, gen: torch.Generator, mean: torch.Tensor, std: torch.Tensor,
    jitter: float = 0.1,
) -> torch.Tensor:
    """Dihedral symmetries + mild colour jitter of a normalised batch (B, 3, S, S)."""
    b = x.shape[0]
    k = torch.randint(0, 4, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.empty_like(x)
    for r in range(4):
        sel = (k == r).nonzero().flatten().to(x.device)
        if sel.numel():
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    fsel = flip.nonzero().flatten().to(x.device)
    if fsel.numel():
        out[fsel] = out[fsel].flip(-1)
    if jitter <= 0:
        return out
    factors = (1.0 + (torch.rand(3, b, generator=gen) * 2 - 1) * jitter).to(x.device, x.dtype)
    bright, contrast, sat = (f.view(b, 1, 1, 1) for f in factors)
    img = out * std + mean  # back to [0, 1]
    img = img * bright
    grey = (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])
    img = (img - grey.mean(dim=(-2, -1), keepdim=True)) * contrast + grey.mean(
        dim=(-2, -1), keepdim=True
    )
    grey = (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])
    img = ((img - grey) * sat + grey).clamp(0.0, 1.0)
    return (img - mean) / std


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(t in name for t in _NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


def _batches(
    images: np.ndarray | torch.Tensor, idx: np.ndarray, size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    for s in range(0, idx.size, size):
        sel = idx[s : s + size]
        yield sel, torch.as_tensor(np.asarray(images[sel]))


@torch.inference_mode()
def _evaluate(
    clf: PathoTuneClassifier, images: np.ndarray, labels: np.ndarray, idx: np.ndarray,
    batch: int, weights: torch.Tensor, amp: bool,
) -> tuple[float, float]:
    """(balanced accuracy, mean weighted loss) over ``idx``."""
    clf.model.eval()
    preds, losses, wsum = [], 0.0, 0.0
    for sel, x in _batches(images, idx, batch):
        y = torch.as_tensor(labels[sel], device=clf.device)
        with autocast(clf.device, amp):
            logits = clf.model(clf.encoder.preprocess(x)).float()
        losses += float(F.cross_entropy(logits, y, weight=weights, reduction="sum"))
        wsum += float(weights[y].sum())
        preds.append(logits.argmax(1).cpu().numpy())
    pred = np.concatenate(preds)
    return balanced_accuracy(labels[idx], pred), losses / max(wsum, 1e-12)


def train_classifier(
    classifier: PathoTuneClassifier,
    images: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    config: TrainConfig | None = None,
    stop_event: threading.Event | None = None,
) -> Generator[TrainProgress, None, TrainResult]:
    """Train ``classifier`` in place on uint8 images (N, H, W, 3) and labels (indices or class
    names; -1/None = unlabelled, skipped). Yields :class:`TrainProgress`; returns
    :class:`TrainResult` (the classifier holds the best epoch's weights)."""
    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    y_all = encode_labels(labels, classifier.class_names)
    if y_all.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {y_all.shape[0]} labels")
    train_idx, val_idx = stratified_split(y_all, cfg.val_fraction, cfg.seed)
    if train_idx.size == 0:
        raise ValueError("no labelled patches to train on")
    if np.unique(y_all[train_idx]).size < 2:
        raise ValueError(
            "training needs labelled patches of at least two classes; found only "
            f"{[classifier.class_names[c] for c in np.unique(y_all[train_idx])]}"
        )

    device = resolve_device(cfg.device)
    classifier.encoder.to(device)
    model = classifier.model.to(device)
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    counts = np.bincount(y_all[train_idx], minlength=model.n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    weights = torch.as_tensor(w, dtype=torch.float32, device=device)
    mean = torch.tensor(classifier.encoder.card.input.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(classifier.encoder.card.input.std, device=device).view(1, 3, 1, 1)

    steps_per_epoch = math.ceil(train_idx.size / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult(classifier, train_indices=train_idx, val_indices=val_idx)
    best_state: dict[str, torch.Tensor] | None = None
    best_key: tuple[float, float] | None = None
    bad_epochs, step, seen, train_time = 0, 0, 0, 0.0
    status = "done"

    def record(status: str, epoch: int, **kw: Any) -> TrainProgress:
        return TrainProgress(
            status=status, epoch=epoch, epochs=cfg.epochs, step=step, total_steps=total,
            best_val_bal_acc=result.val_bal_acc, best_epoch=result.best_epoch,
            rate=seen / train_time if train_time > 0 else None,
            elapsed_s=time.perf_counter() - t0, **kw,
        )

    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            order = train_idx[torch.randperm(train_idx.size, generator=gen).numpy()]
            ep_loss, ep_correct, ep_n = 0.0, 0, 0
            for sel, x in _batches(images, order, cfg.batch_size):
                if stop_event is not None and stop_event.is_set():
                    status = "cancelled"
                    break
                ts = time.perf_counter()
                y = torch.as_tensor(y_all[sel], device=device)
                xb = classifier.encoder.preprocess(x)
                if cfg.augment:
                    xb = augment_batch(xb, gen, mean, std, cfg.colour_jitter)
                with autocast(device, cfg.amp):
                    logits = model(xb).float()
                loss = F.cross_entropy(logits, y, weight=weights)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                train_time += time.perf_counter() - ts
                step += 1
                seen += int(sel.size)
                ep_loss += float(loss.detach()) * sel.size
                ep_correct += int((logits.argmax(1) == y).sum())
                ep_n += int(sel.size)
                yield record("step", epoch, loss=float(loss.detach()), lr=sched.get_last_lr()[0])
            if status == "cancelled":
                break
            entry: dict[str, Any] = {
                "epoch": epoch, "loss": ep_loss / max(ep_n, 1),
                "train_acc": ep_correct / max(ep_n, 1), "val_bal_acc": None, "val_loss": None,
            }
            if val_idx.size:
                bal, vloss = _evaluate(classifier, images, y_all, val_idx,
                                       cfg.eval_batch_size, weights, cfg.amp)
                entry.update(val_bal_acc=bal, val_loss=vloss)
                key = (bal, -vloss)
                improved = best_key is None or key > best_key
            else:
                improved = True  # no validation: keep the latest epoch
            if improved:
                best_key = (entry["val_bal_acc"] or 0.0, -(entry["val_loss"] or 0.0))
                best_state = {k: v.detach().clone() for k, v in model.trainable_state().items()}
                result.best_epoch, result.val_bal_acc = epoch, entry["val_bal_acc"]
                bad_epochs = 0
            else:
                bad_epochs += 1
            result.history.append(entry)
            yield record("epoch", epoch, loss=entry["loss"], train_acc=entry["train_acc"],
                         val_bal_acc=entry["val_bal_acc"], val_loss=entry["val_loss"],
                         lr=sched.get_last_lr()[0])
            if val_idx.size and bad_epochs >= cfg.patience:
                status = "stopped-early"
                break
    finally:
        if best_state is not None:
            model.load_state_dict(best_state, strict=False)
        model.eval()
    result.cancelled = status == "cancelled"
    result.stopped_early = status == "stopped-early"
    result.train_patches_per_s = seen / train_time if train_time > 0 else 0.0
    result.elapsed_s = time.perf_counter() - t0
    classifier.info.update({
        "training": {
            "config": cfg.to_dict(), "n_train": int(train_idx.size), "n_val": int(val_idx.size),
            "class_counts": {n: int(c) for n, c in zip(classifier.class_names, counts)},
            "best_epoch": result.best_epoch, "val_bal_acc": result.val_bal_acc,
            "epochs_run": len(result.history), "status": status,
            "device": str(device),
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
        },
    })
    yield record(status, len(result.history), message=_summary(result, status))
    return result


def _summary(result: TrainResult, status: str) -> str:
    if result.val_bal_acc is None:
        return f"{status}: {len(result.history)} epoch(s), no validation split"
    return (f"{status}: best validation balanced accuracy {result.val_bal_acc:.3f} "
            f"at epoch {result.best_epoch}")


def train_from_arrays(
    encoder: Any,
    images: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    class_names: Sequence[str],
    prompt_config: PromptConfig | None = None,
    template: TextTemplate | None = None,
    train_config: TrainConfig | None = None,
    text_encoder: TextEncoder | None = None,
    colours: np.ndarray | None = None,
    stop_event: threading.Event | None = None,
) -> Generator[TrainProgress, None, TrainResult]:
    """Build a classifier on ``encoder`` and train it on uint8 tiles (N, H, W, 3)."""
    cfg = train_config or TrainConfig()
    clf = build_classifier(encoder, class_names, prompt_config, template, text_encoder,
                           colours, seed=cfg.seed)
    return (yield from train_classifier(clf, images, labels, cfg, stop_event))


def read_patches(
    slide_path: str | Path,
    coords: np.ndarray,
    patch_size_level0: int,
    out_size: int,
    mpp: float | None = None,
    num_workers: int | None = None,
    batch_size: int = 32,
    stop_event: threading.Event | None = None,
) -> Generator[TrainProgress, None, np.ndarray | None]:
    """Read patches (uint8 (N, out, out, 3)) with the tiles loader's worker processes, yielding
    ``"reading"`` records; returns ``None`` when cancelled."""
    from napari_gpfm.tiles.loader import PatchDataset, iter_batches

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    n = coords.shape[0]
    out = np.empty((n, out_size, out_size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    ds = PatchDataset(slide_path, coords, patch_size_level0, out_size, mpp=mpp)
    workers = 0 if n <= batch_size else num_workers
    with iter_batches(ds, batch_size=batch_size, num_workers=workers) as stream:
        done = 0
        for patches, index in stream:
            out[index.numpy()] = patches.numpy()
            done += int(index.numel())
            el = time.perf_counter() - t0
            yield TrainProgress("reading", 0, 0, done, n, rate=done / el if el else None,
                                elapsed_s=el, message=f"read {done}/{n} labelled patches")
            if stop_event is not None and stop_event.is_set():
                return None
    return out


def train_from_slide(
    encoder: Any,
    slide_path: str | Path,
    coords: np.ndarray,
    patch_size_level0: int,
    labels: Sequence[Any] | np.ndarray,
    class_names: Sequence[str],
    prompt_config: PromptConfig | None = None,
    template: TextTemplate | None = None,
    train_config: TrainConfig | None = None,
    text_encoder: TextEncoder | None = None,
    colours: np.ndarray | None = None,
    mpp: float | None = None,
    target_mpp: float | None = None,
    num_workers: int | None = None,
    stop_event: threading.Event | None = None,
) -> Generator[TrainProgress, None, TrainResult | None]:
    """Train on the labelled patches of a slide grid (``labels`` per row of ``coords``, e.g.
    from :func:`napari_gpfm.annotations.labels_from_annotations`): the labelled patches are read
    at the encoder's input size (kept in memory, ~150 KB each at 224 px), then trained on.
    Returns ``None`` when cancelled while reading."""
    y = encode_labels(labels, class_names)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if y.shape[0] != coords.shape[0]:
        raise ValueError(f"{coords.shape[0]} coords but {y.shape[0]} labels")
    keep = np.flatnonzero(y >= 0)
    if keep.size == 0:
        raise ValueError(f"{slide_path}: no labelled patches (no patch lies in an annotation)")
    images = yield from read_patches(slide_path, coords[keep], patch_size_level0,
                                     int(encoder.card.input.size), mpp, num_workers,
                                     stop_event=stop_event)
    if images is None:
        return None
    result = yield from train_from_arrays(encoder, images, y[keep], class_names, prompt_config,
                                          template, train_config, text_encoder, colours,
                                          stop_event)
    if mpp is None:
        from napari_gpfm.slide import open_slide

        mpp = open_slide(slide_path).mpp  # level-0 µm/px, for the geometry check at prediction
    result.classifier.info["tiles"] = {
        "slide": str(slide_path), "patch_size_level0": int(patch_size_level0),
        "mpp": mpp, "target_mpp": target_mpp, "n_labelled": int(keep.size),
    }
    return result
