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

Entry points: :func:`train_from_slide` (labelled patches of a slide grid, a
:class:`~napari_gpfm.analyses.classifier.PatchSet`), :func:`train_from_arrays` (tiles in memory)
and :func:`tune` (an existing classifier, in place); all return the
:class:`~napari_gpfm.analyses.classifier.TrainResult` every classifier kind returns. What to
build and how to train travel in one :class:`TuneOptions`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from napari_gpfm.encoders.device import autocast, autocast_dtype, resolve_device

from napari_gpfm.analyses.classifier import PatchSet, TrainResult
from napari_gpfm.analyses.probe import balanced_accuracy

from .model import PathoTuneClassifier, PromptConfig, build_classifier
from .text import TextEncoder, TextTemplate

__all__ = [
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "TuneOptions",
    "augment_batch",
    "encode_labels",
    "read_patches",
    "run",
    "stratified_split",
    "train_from_arrays",
    "train_from_slide",
    "tune",
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


@dataclass(frozen=True)
class TuneOptions:
    """What to build and how to train it (every field optional).

    Attributes:
        prompt_config: which prompts (TVP, TTP, IVP) and head (default :class:`PromptConfig`).
        template: the text prompts' template (default :class:`TextTemplate`).
        train_config: optimisation settings (default :class:`TrainConfig`).
        text_encoder: sentence encoder for the text prompts (default MiniLM).
        colours: (C, 3) RGB 0-255 of the classes, kept in the classifier file.
        num_workers: patch-reading processes (default: the tiles loader's).
    """

    prompt_config: PromptConfig | None = None
    template: TextTemplate | None = None
    train_config: TrainConfig | None = None
    text_encoder: TextEncoder | None = None
    colours: np.ndarray | None = None
    num_workers: int | None = None

    @property
    def config(self) -> TrainConfig:
        return self.train_config or TrainConfig()


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


class _Run:
    """One training run's state: the data and split, the optimiser, the best epoch so far."""

    def __init__(self, classifier: PathoTuneClassifier, images: np.ndarray, labels: Any,
                 cfg: TrainConfig) -> None:  # fmt: skip
        self.clf, self.cfg, self.t0 = classifier, cfg, time.perf_counter()
        self.images, self.y = _checked_inputs(images, labels, classifier.class_names)
        self.train_idx, self.val_idx = _split(self.y, cfg, classifier.class_names)
        self.device = resolve_device(cfg.device)
        classifier.encoder.to(self.device)
        self.model = classifier.model.to(self.device)
        self.amp_dtype = autocast_dtype(self.device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.counts = np.bincount(self.y[self.train_idx],
                                  minlength=self.model.n_classes).astype(np.float64)
        self.weights = torch.as_tensor(_class_weights(self.counts), dtype=torch.float32,
                                       device=self.device)
        card = classifier.encoder.card.input
        self.mean = torch.tensor(card.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(card.std, device=self.device).view(1, 3, 1, 1)
        steps_per_epoch = math.ceil(self.train_idx.size / cfg.batch_size)
        self.total = max(1, cfg.epochs * steps_per_epoch)
        self.opt = torch.optim.AdamW(_param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _lr_lambda(self.total, int(round(cfg.warmup_epochs * steps_per_epoch))))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.result = TrainResult(classifier, train_indices=self.train_idx,
                                  val_indices=self.val_idx)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_key: tuple[float, float] | None = None
        self.bad_epochs = self.step = self.seen = 0
        self.train_time = 0.0

    def record(self, status: str, epoch: int, **kw: Any) -> TrainProgress:
        return TrainProgress(
            status=status, epoch=epoch, epochs=self.cfg.epochs, step=self.step,
            total_steps=self.total, best_val_bal_acc=self.result.val_bal_acc,
            best_epoch=self.result.best_epoch,
            rate=self.seen / self.train_time if self.train_time > 0 else None,
            elapsed_s=time.perf_counter() - self.t0, **kw,
        )

    def optimiser_step(self, sel: np.ndarray, x: torch.Tensor) -> tuple[float, int]:
        """One step on a batch: (loss, correct predictions)."""
        ts = time.perf_counter()
        y = torch.as_tensor(self.y[sel], device=self.device)
        xb = self.clf.encoder.preprocess(x)
        if self.cfg.augment:
            xb = augment_batch(xb, self.gen, self.mean, self.std, self.cfg.colour_jitter)
        with autocast(self.device, self.cfg.amp):
            logits = self.model(xb).float()
        loss = F.cross_entropy(logits, y, weight=self.weights)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.train_time += time.perf_counter() - ts
        self.step += 1
        self.seen += int(sel.size)
        return float(loss.detach()), int((logits.argmax(1) == y).sum())

    def epoch(self, epoch: int, stop_event: threading.Event | None
              ) -> Generator[TrainProgress, None, dict[str, Any] | None]:  # fmt: skip
        """Train one epoch, yielding a record per step; the epoch's entry, or ``None`` when
        cancelled."""
        self.model.train()
        order = self.train_idx[torch.randperm(self.train_idx.size, generator=self.gen).numpy()]
        total_loss, correct, n = 0.0, 0, 0
        for sel, x in _batches(self.images, order, self.cfg.batch_size):
            if stop_event is not None and stop_event.is_set():
                return None
            loss, ok = self.optimiser_step(sel, x)
            total_loss, correct, n = total_loss + loss * sel.size, correct + ok, n + sel.size
            yield self.record("step", epoch, loss=loss, lr=self.sched.get_last_lr()[0])
        return {"epoch": epoch, "loss": total_loss / max(n, 1), "train_acc": correct / max(n, 1),
                "val_bal_acc": None, "val_loss": None}

    def validate(self, entry: dict[str, Any]) -> bool:
        """Score the epoch on the validation split; keep its weights when best. Returns
        whether training should stop early (``patience`` epochs without improvement)."""
        if self.val_idx.size:
            bal, vloss = _evaluate(self.clf, self.images, self.y, self.val_idx,
                                   self.cfg.eval_batch_size, self.weights, self.cfg.amp)
            entry.update(val_bal_acc=bal, val_loss=vloss)
            improved = self.best_key is None or (bal, -vloss) > self.best_key
        else:
            improved = True  # no validation: keep the latest epoch
        if improved:
            self.best_key = (entry["val_bal_acc"] or 0.0, -(entry["val_loss"] or 0.0))
            self.best_state = {k: v.detach().clone()
                               for k, v in self.model.trainable_state().items()}
            self.result.best_epoch, self.result.val_bal_acc = entry["epoch"], entry["val_bal_acc"]
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.result.history.append(entry)
        return bool(self.val_idx.size) and self.bad_epochs >= self.cfg.patience

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state, strict=False)
        self.model.eval()

    def finish(self, status: str) -> TrainResult:
        """The result, and what the classifier file records about the run."""
        r, cfg = self.result, self.cfg
        r.cancelled, r.stopped_early = status == "cancelled", status == "stopped-early"
        r.train_patches_per_s = self.seen / self.train_time if self.train_time > 0 else 0.0
        r.elapsed_s = time.perf_counter() - self.t0
        self.clf.info["training"] = {
            "config": cfg.to_dict(), "n_train": int(self.train_idx.size),
            "n_val": int(self.val_idx.size),
            "class_counts": {n: int(c) for n, c in zip(self.clf.class_names, self.counts)},
            "best_epoch": r.best_epoch, "val_bal_acc": r.val_bal_acc,
            "epochs_run": len(r.history), "status": status, "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
        }  # fmt: skip
        return r


def _checked_inputs(images: np.ndarray, labels: Any, class_names: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    y = encode_labels(labels, class_names)
    if y.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {y.shape[0]} labels")
    return images, y


def _split(y: np.ndarray, cfg: TrainConfig, class_names: Sequence[str]
           ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    train_idx, val_idx = stratified_split(y, cfg.val_fraction, cfg.seed)
    if train_idx.size == 0:
        raise ValueError("no labelled patches to train on")
    if np.unique(y[train_idx]).size < 2:
        raise ValueError(
            "training needs labelled patches of at least two classes; found only "
            f"{[class_names[c] for c in np.unique(y[train_idx])]}"
        )
    return train_idx, val_idx


def _class_weights(counts: np.ndarray) -> np.ndarray:
    """Balanced cross-entropy weights (``n / (classes present · count)``; 0 for absent)."""
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    return w


def tune(
    classifier: PathoTuneClassifier,
    images: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    config: TrainConfig | None = None,
    stop_event: threading.Event | None = None,
) -> Generator[TrainProgress, None, TrainResult]:
    """Train ``classifier`` in place on uint8 images (N, H, W, 3) and labels (indices or class
    names; -1/None = unlabelled, skipped). Yields :class:`TrainProgress`; returns
    :class:`TrainResult` (the classifier holds the best epoch's weights)."""
    run_ = _Run(classifier, images, labels, config or TrainConfig())
    status = "done"
    try:
        for epoch in range(1, run_.cfg.epochs + 1):
            entry = yield from run_.epoch(epoch, stop_event)
            if entry is None:
                status = "cancelled"
                break
            stop = run_.validate(entry)
            yield run_.record("epoch", epoch, loss=entry["loss"], train_acc=entry["train_acc"],
                              val_bal_acc=entry["val_bal_acc"], val_loss=entry["val_loss"],
                              lr=run_.sched.get_last_lr()[0])
            if stop:
                status = "stopped-early"
                break
    finally:
        run_.restore_best()
    result = run_.finish(status)
    yield run_.record(status, len(result.history), message=_summary(result, status))
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
    options: TuneOptions | None = None,
    stop_event: threading.Event | None = None,
) -> Generator[TrainProgress, None, TrainResult]:
    """Build a classifier on ``encoder`` and train it on uint8 tiles (N, H, W, 3)."""
    opt = options or TuneOptions()
    clf = build_classifier(encoder, class_names, opt.prompt_config, opt.template,
                           opt.text_encoder, opt.colours, seed=opt.config.seed)
    return (yield from tune(clf, images, labels, opt.config, stop_event))


def read_patches(
    patches: PatchSet,
    out_size: int,
    num_workers: int | None = None,
    batch_size: int = 32,
    stop_event: threading.Event | None = None,
) -> Generator[TrainProgress, None, np.ndarray | None]:
    """Read ``patches`` (uint8 (N, out, out, 3)) with the tiles loader's worker processes,
    yielding ``"reading"`` records; returns ``None`` when cancelled."""
    from napari_gpfm.tiles.loader import PatchDataset, iter_batches

    n = patches.coords.shape[0]
    out = np.empty((n, out_size, out_size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    ds = PatchDataset(patches.slide_path, patches.coords, patches.patch_size_level0, out_size,
                      mpp=patches.mpp)  # fmt: skip
    workers = 0 if n <= batch_size else num_workers
    with iter_batches(ds, batch_size=batch_size, num_workers=workers) as stream:
        done = 0
        for batch, index in stream:
            out[index.numpy()] = batch.numpy()
            done += int(index.numel())
            el = time.perf_counter() - t0
            yield TrainProgress("reading", 0, 0, done, n, rate=done / el if el else None,
                                elapsed_s=el, message=f"read {done}/{n} labelled patches")
            if stop_event is not None and stop_event.is_set():
                return None
    return out


def train_from_slide(
    encoder: Any,
    patches: PatchSet,
    labels: Sequence[Any] | np.ndarray,
    class_names: Sequence[str],
    options: TuneOptions | None = None,
    stop_event: threading.Event | None = None,
) -> Generator[TrainProgress, None, TrainResult | None]:
    """Train on the labelled patches of a slide grid (``labels`` per row of
    ``patches.coords``, e.g. from :func:`napari_gpfm.annotations.labels_from_annotations`): the
    labelled patches are read at the encoder's input size (kept in memory, ~150 KB each at
    224 px), then trained on. The classifier records the grid (patch side, mpp, the grid's
    recipe) so it can find or rebuild the same tiling on other slides. Returns ``None`` when
    cancelled while reading."""
    opt = options or TuneOptions()
    y = encode_labels(labels, class_names)
    if y.shape[0] != patches.coords.shape[0]:
        raise ValueError(f"{patches.coords.shape[0]} coords but {y.shape[0]} labels")
    keep = np.flatnonzero(y >= 0)
    if keep.size == 0:
        raise ValueError(f"{patches.slide_path}: no labelled patches (no patch lies in an "
                         "annotation)")
    labelled = patches.subset(keep)
    images = yield from read_patches(labelled, int(encoder.card.input.size), opt.num_workers,
                                     stop_event=stop_event)
    if images is None:
        return None
    result = yield from train_from_arrays(encoder, images, y[keep], class_names, opt, stop_event)
    result.classifier.info["tiles"] = _tiles_info(patches, int(keep.size))
    return result


def _tiles_info(patches: PatchSet, n_labelled: int) -> dict[str, Any]:
    """The training grid as the classifier file records it (the level-0 mpp, read from the
    slide when not given, is what the geometry check at prediction compares)."""
    mpp = patches.mpp
    if mpp is None:
        from napari_gpfm.slide import open_slide

        mpp = open_slide(patches.slide_path).mpp
    return {"slide": str(patches.slide_path), "patch_size_level0": patches.patch_size_level0,
            "mpp": mpp, "target_mpp": patches.recipe.get("target_mpp"),
            "recipe": dict(patches.recipe), "n_labelled": n_labelled}
