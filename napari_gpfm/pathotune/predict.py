"""Prediction with a PathoTune classifier: tile arrays, or every patch of a slide grid.

Over a slide, patches are decoded by the tiles loader's worker processes
(:func:`napari_gpfm.tiles.loader.iter_batches`) while the main process runs batched inference,
so decoding and the model overlap. Probabilities come back in the order of the given coords,
i.e. aligned row for row with a feature store's ``coords`` (``predict_store``), ready for
:func:`napari_gpfm.analyses.heatmap.labels_raster` / ``heatmap_raster``.
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

from napari_gpfm.encoders.device import autocast
from napari_gpfm.errors import NapariGpfmError

from .model import PathoTuneClassifier

__all__ = [
    "GeometryMismatchError",
    "PredictProgress",
    "PredictResult",
    "check_geometry",
    "predict_arrays",
    "predict_slide",
    "predict_store",
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


@dataclass
class PredictResult:
    """Per-patch probabilities (N, K) float32 aligned with ``coords`` (N, 2).

    ``done`` is False when cancelled (rows not reached are NaN)."""

    proba: np.ndarray
    coords: np.ndarray
    patch_size_level0: int
    class_names: list[str]
    done: bool = True
    patches_per_s: float = 0.0

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 predicted class, -1 where not predicted."""
        ok = np.isfinite(self.proba).all(axis=1)
        out = np.full(self.proba.shape[0], -1, dtype=np.int64)
        out[ok] = self.proba[ok].argmax(axis=1)
        return out

    def rasters(self, mpp: float | None = None) -> dict[str, Any]:
        """Rasters aligned with the slide: ``"classes"`` (class ``i`` painted ``i + 1``),
        ``"p:<class>"`` per class and ``"entropy"`` (normalised 0..1), like the linear probe's."""
        from napari_gpfm.analyses.heatmap import heatmap_raster, labels_raster, patch_grid
        from napari_gpfm.analyses.probe import entropy

        grid = patch_grid(self.coords, self.patch_size_level0, mpp)
        out = {"classes": labels_raster(self.labels, grid)}
        for i, name in enumerate(self.class_names):
            out[f"p:{name}"] = heatmap_raster(self.proba[:, i], grid)
        ent = np.full(self.proba.shape[0], np.nan, dtype=np.float32)
        ok = np.isfinite(self.proba).all(axis=1)
        ent[ok] = entropy(self.proba[ok], len(self.class_names))
        out["entropy"] = heatmap_raster(ent, grid)
        return out


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
    slide_path: str | Path,
    coords: np.ndarray,
    patch_size_level0: int,
    mpp: float | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    stop_event: threading.Event | None = None,
) -> Generator[PredictProgress, None, PredictResult]:
    """Probabilities for every patch ``coords`` (level-0 top-left, side ``patch_size_level0``),
    read at the encoder's input size. Yields a record per batch (closing the generator or
    setting ``stop_event`` cancels); returns a :class:`PredictResult` in ``coords`` order."""
    from napari_gpfm.tiles.loader import PatchDataset, iter_batches

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    n = coords.shape[0]
    proba = np.full((n, len(classifier.class_names)), np.nan, dtype=np.float32)
    classifier.model.eval()
    ds = PatchDataset(slide_path, coords, patch_size_level0,
                      int(classifier.encoder.card.input.size), mpp=mpp)
    t0 = time.perf_counter()
    done, status = 0, "done"
    with iter_batches(ds, batch_size=batch_size,
                      num_workers=0 if n <= batch_size else num_workers) as stream:
        for patches, index in stream:
            if stop_event is not None and stop_event.is_set():
                status = "cancelled"
                break
            proba[index.numpy()] = _proba(classifier, patches)
            done += int(index.numel())
            el = time.perf_counter() - t0
            rate = done / el if el > 0 else None
            eta = (n - done) / rate if rate else None
            yield PredictProgress(done, n, rate, eta, el, "running")
    el = time.perf_counter() - t0
    yield PredictProgress(done, n, done / el if el else None, 0.0, el, status)
    return PredictResult(proba, coords, int(patch_size_level0), list(classifier.class_names),
                         done=status == "done", patches_per_s=done / el if el else 0.0)


def check_geometry(classifier: PathoTuneClassifier, store: Any) -> None:
    """Refuse a store whose patches differ physically from the training patches (patch side in
    µm, 2 % tolerance) or whose grid was made for another input size. Silent when either side
    does not record it."""
    tiles = classifier.info.get("tiles") or {}
    p0, mpp = tiles.get("patch_size_level0"), tiles.get("mpp")
    s_p0, s_mpp = getattr(store, "patch_size_level0", None), getattr(store, "mpp", None)
    if p0 and mpp and s_p0 and s_mpp:
        a, b = float(p0) * float(mpp), float(s_p0) * float(s_mpp)
        if not math.isclose(a, b, rel_tol=0.02):
            raise GeometryMismatchError(
                f"{getattr(store, 'path', 'store')}: its patches are {b:.1f} µm wide but the "
                f"classifier was trained on {a:.1f} µm patches; embed the slide with the tiling "
                "used for training (same target mpp and patch size)"
            )


def predict_store(
    classifier: PathoTuneClassifier,
    store: Any,
    slide_path: str | Path,
    mpp: float | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    stop_event: threading.Event | None = None,
) -> Generator[PredictProgress, None, PredictResult]:
    """:func:`predict_slide` on a feature store's grid (``store.coords``,
    ``store.patch_size_level0``), so row ``i`` of the result is row ``i`` of the store."""
    if store.coords is None or store.patch_size_level0 is None:
        raise ValueError(
            f"{getattr(store, 'path', 'store')}: the feature file records no coords or patch "
            "size, so its grid cannot be predicted on"
        )
    check_geometry(classifier, store)
    return (yield from predict_slide(classifier, slide_path, store.coords,
                                     store.patch_size_level0, mpp, batch_size, num_workers,
                                     stop_event))
