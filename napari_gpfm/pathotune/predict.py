"""Prediction with a PathoTune classifier: tile arrays, or every patch of a slide grid.

Over a slide, patches are decoded by the tiles loader's worker processes
(:func:`napari_gpfm.tiles.loader.iter_batches`) while the main process runs batched inference,
so decoding and the model overlap. The result is the
:class:`~napari_gpfm.analyses.classifier.Prediction` every classifier kind returns, in the order
of the given coords, i.e. aligned row for row with a feature store's ``coords``
(``PathoTuneClassifier.predict_store``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_gpfm.analyses.classifier import PatchSet, Prediction
from napari_gpfm.encoders.device import autocast
from napari_gpfm.errors import NapariGpfmError

from .model import PathoTuneClassifier

__all__ = [
    "GeometryMismatchError",
    "PredictProgress",
    "check_geometry",
    "predict_arrays",
    "predict_slide",
    "store_patches",
]


class GeometryMismatchError(NapariGpfmError, ValueError):
    """The patches to predict have another physical size than the training patches."""


@dataclass
class PredictProgress:
    """Patches done of total, patches/s, seconds left; status ``"running"``, ``"done"`` or
    ``"cancelled"``."""

    done: int
    total: int
    rate: float | None
    eta_s: float | None
    elapsed_s: float
    status: str

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@torch.inference_mode()
def _proba(clf: PathoTuneClassifier, batch: torch.Tensor | np.ndarray) -> np.ndarray:
    with autocast(clf.device):
        logits = clf.model(clf.encoder.preprocess(batch)).float()
    return logits.softmax(dim=1).cpu().numpy().astype(np.float32)


def predict_arrays(
    classifier: PathoTuneClassifier, images: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """(N, K) float32 class probabilities of uint8 tiles (N, H, W, 3)."""
    classifier.model.eval()
    images = np.asarray(images)
    out = [_proba(classifier, torch.as_tensor(images[s : s + batch_size]))
           for s in range(0, images.shape[0], batch_size)]
    k = len(classifier.class_names)
    return np.concatenate(out) if out else np.zeros((0, k), np.float32)


def predict_slide(
    classifier: PathoTuneClassifier,
    patches: PatchSet,
    batch_size: int = 32,
    num_workers: int | None = None,
    stop_event: threading.Event | None = None,
) -> Generator[PredictProgress, None, Prediction]:
    """Probabilities for every patch of ``patches`` (a slide grid: level-0 top-left coords,
    side ``patch_size_level0``), read at the encoder's input size. Yields a record per batch
    (closing the generator or setting ``stop_event`` cancels); returns the
    :class:`~napari_gpfm.analyses.classifier.Prediction` in ``coords`` order (rows not reached
    when cancelled: NaN, class -1, ``complete`` False)."""
    from napari_gpfm.tiles.loader import PatchDataset, iter_batches

    n = patches.coords.shape[0]
    proba = np.full((n, len(classifier.class_names)), np.nan, dtype=np.float32)
    classifier.model.eval()
    ds = PatchDataset(patches.slide_path, patches.coords, patches.patch_size_level0,
                      int(classifier.encoder.card.input.size), mpp=patches.mpp)
    t0 = time.perf_counter()
    done, status = 0, "done"
    with iter_batches(ds, batch_size=batch_size,
                      num_workers=0 if n <= batch_size else num_workers) as stream:
        for batch, index in stream:
            if stop_event is not None and stop_event.is_set():
                status = "cancelled"
                break
            proba[index.numpy()] = _proba(classifier, batch)
            done += int(index.numel())
            el = time.perf_counter() - t0
            rate = done / el if el > 0 else None
            eta = (n - done) / rate if rate else None
            yield PredictProgress(done, n, rate, eta, el, "running")
    el = time.perf_counter() - t0
    yield PredictProgress(done, n, done / el if el else None, 0.0, el, status)
    return Prediction.from_proba(proba, classifier.class_names, patches,
                                 colours=classifier.colours, recipe=classifier.recipe,
                                 patches_per_s=done / el if el else 0.0)


def check_geometry(classifier: PathoTuneClassifier, store: Any,
                   source: str | Path | None = None) -> None:
    """Refuse a store whose patches differ physically from the training patches (patch side in
    µm, 2 % tolerance) or whose grid was made for another input size. Silent when either side
    does not record it."""
    tiles = classifier.info.get("tiles") or {}
    p0, mpp = tiles.get("patch_size_level0"), tiles.get("mpp")
    s_p0, s_mpp = getattr(store, "patch_size_level0", None), getattr(store, "mpp", None)
    if p0 and mpp and s_p0 and s_mpp:
        a, b = float(p0) * float(mpp), float(s_p0) * float(s_mpp)
        if not math.isclose(a, b, rel_tol=0.02):
            where = f"the classifier {source}" if source else "the classifier"
            raise GeometryMismatchError(
                f"{getattr(store, 'path', None) or 'these patches'}: its patches are {b:.1f} µm "
                f"wide but {where} was trained on {a:.1f} µm patches; embed the slide with the "
                "tiling used for training (same target mpp and patch size)"
            )


def store_patches(store: Any, slide_path: str | Path | None = None) -> PatchSet:
    """The grid of ``store`` (a feature store or a :class:`PatchSet`) to read pixels from;
    the slide is ``slide_path``, else the one the store records."""
    if isinstance(store, PatchSet):
        return store if slide_path is None else PatchSet(
            str(slide_path), store.coords, store.patch_size_level0, store.mpp, store.recipe)
    if store.coords is None or store.patch_size_level0 is None:
        raise ValueError(
            f"{getattr(store, 'path', 'store')}: the feature file records no coords or patch "
            "size, so its grid cannot be predicted on"
        )
    patches = PatchSet.from_store(store, slide_path)
    if not patches.slide_path:
        raise GeometryMismatchError(
            f"{getattr(store, 'path', 'store')}: the feature file records no slide file, so "
            "PathoTune has no pixels to read; give the slide"
        )
    return patches
