"""One classifier surface: what every patch classifier is, what it predicts, and how it is named.

Two kinds implement :class:`Classifier`: the linear probe on stored embeddings
(:class:`~napari_gpfm.analyses.probe.LinearProbe`, an ``.npz`` file) and PathoTune, prompts tuned
on a frozen backbone over the patches' pixels
(:class:`~napari_gpfm.pathotune.model.PathoTuneClassifier`, a ``.safetensors`` file). Both

- fit from labelled patches (a :class:`PatchSet` of one slide and one label per patch;
  ``analyses.classify.train_probe`` and ``pathotune.train_from_slide``) into one
  :class:`TrainResult`;
- save to one file bound to the recipe they were trained on (``recipe``: model, weights SHA-256,
  target mpp, patch size...) and are read back by one loader,
  :func:`napari_gpfm.jobs.classifiers.load_classifier`, which picks the kind from the file's
  content (it lives in ``jobs`` because ``analyses`` never imports ``pathotune``);
- predict a feature store (or, for PathoTune, any :class:`PatchSet` of a slide) into one
  :class:`Prediction`: per-patch classes, per-class probabilities and normalised entropy, with
  the patches' coordinates and rasters aligned with the slide.

Per-patch output columns have one naming everywhere (CSV, HDF5 attributes, feature tables and
QuPath detection measurements): ``class`` (index), ``class_name``, ``prob_<class name>`` per
class (:func:`prob_column`) and ``uncertainty`` (normalised entropy, 0 = certain, 1 = uniform);
:meth:`Prediction.columns` builds them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import NapariGpfmError
from .heatmap import PatchGrid, Raster, heatmap_raster, labels_raster, patch_grid

__all__ = [
    "PROB_PREFIX",
    "Classifier",
    "ClassifierFileError",
    "PatchSet",
    "Prediction",
    "TrainResult",
    "entropy",
    "prob_column",
]

#: Prefix of the per-class probability columns (``prob_Tumor``) in every per-patch output.
PROB_PREFIX = "prob_"


def prob_column(class_name: str) -> str:
    """The per-patch probability column of a class: ``prob_<class name>``."""
    return f"{PROB_PREFIX}{class_name}"


class ClassifierFileError(NapariGpfmError, ValueError):
    """A classifier file is missing, unreadable, damaged or of no known kind (names the file)."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def entropy(proba: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """(N,) entropy (nats) of probability rows; divided by ``log(n_classes)`` when given, so
    0 = certain and 1 = uniform over the classes (the usual uncertainty for active labelling)."""
    p = np.asarray(proba, dtype=np.float64)
    h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
    if n_classes is not None and n_classes > 1:
        h /= math.log(n_classes)
    return h.astype(np.float32)


@dataclass(frozen=True, eq=False)
class PatchSet:
    """Patches of one slide: the file, where each patch is and how large, and the grid's recipe.

    Duck-types as a feature store's grid (``coords``, ``patch_size_level0``, ``mpp``,
    ``slide_path``, ``slide_name``, ``recipe``), so a classifier that reads pixels (PathoTune)
    predicts a bare grid the way it predicts a store.

    Attributes:
        slide_path: the slide file the pixels come from.
        coords: (N, 2) int64 level-0 top-left (x, y) of each patch.
        patch_size_level0: patch side in level-0 pixels.
        mpp: level-0 µm/px (the user's override, else ``None``: read from the file).
        recipe: how the grid was made (model, target mpp, patch size, overlap, tissue...), as a
            store records it; classifiers keep it to find or rebuild the grid of another slide.
    """

    slide_path: str | None
    coords: np.ndarray
    patch_size_level0: int
    mpp: float | None = None
    recipe: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "patch_size_level0", int(self.patch_size_level0))

    @property
    def slide_name(self) -> str:
        return Path(self.slide_path).stem if self.slide_path else "slide"

    @property
    def path(self) -> None:  # no feature file behind a bare grid
        return None

    def subset(self, rows: np.ndarray) -> PatchSet:
        """The same slide and grid, only ``rows``."""
        return PatchSet(self.slide_path, self.coords[rows], self.patch_size_level0, self.mpp,
                        self.recipe)

    @classmethod
    def from_store(cls, store: Any, slide_path: str | os.PathLike | None = None,
                   mpp: float | None = None) -> PatchSet:  # fmt: skip
        """The grid of a feature store (``slide_path`` default: the one it records)."""
        from .classify import store_geometry, store_recipe

        coords, size0, store_mpp = store_geometry(store)
        slide = slide_path or getattr(store, "slide_path", None)
        return cls(None if slide is None else os.fspath(slide), coords, size0,
                   mpp if mpp is not None else store_mpp, store_recipe(store))


@runtime_checkable
class Classifier(Protocol):
    """What every patch classifier offers (the linear probe and PathoTune)."""

    #: ``"linear"`` or ``"pathotune"`` (``train-classifier --method``).
    kind: str
    class_names: list[str]
    #: (C, 3) RGB 0-255 of ``class_names``, or ``None``.
    colours: np.ndarray | None

    @property
    def recipe(self) -> dict:
        """What the classifier is bound to: ``model``, ``weights_sha256``, ``target_mpp``,
        ``patch_size`` (and the rest of the grid's recipe when known)."""
        ...

    def save(self, path: str | os.PathLike) -> Path:
        """Write the classifier file (with its recipe) and return its path."""
        ...

    def check_store(self, store: Any, source: str | os.PathLike | None = None,
                    assume_model: str | None = None) -> None:  # fmt: skip
        """Raise a :class:`~napari_gpfm.errors.NapariGpfmError` naming ``source`` (the
        classifier file) or the store when ``store``'s patches are not of the recipe the
        classifier was trained on."""
        ...

    def predict_store(self, store: Any, assume_model: str | None = None) -> Prediction:
        """Every patch of ``store`` (a feature store, or a :class:`PatchSet` for a classifier
        that reads pixels), after :meth:`check_store`."""
        ...


@dataclass(eq=False)
class Prediction:
    """Per-patch predictions of a classifier on one slide's patches, with their rasters.

    Rows not predicted (a cancelled run) hold NaN probabilities, class ``-1`` and NaN entropy;
    ``complete`` is then False. Build one with :meth:`from_proba`.
    """

    proba: np.ndarray  # (N, C) float32
    labels: np.ndarray  # (N,) int64 argmax, -1 where not predicted
    entropy: np.ndarray  # (N,) float32, normalised 0..1
    class_names: list[str]
    colours: np.ndarray | None  # (C, 3) RGB 0-255
    coords: np.ndarray
    patch_size_level0: int
    mpp: float | None
    slide_name: str = "slide"
    recipe: dict = field(default_factory=dict)
    complete: bool = True
    patches_per_s: float = 0.0
    _grid: PatchGrid | None = field(default=None, repr=False)

    @classmethod
    def from_proba(cls, proba: np.ndarray, class_names: Sequence[str], patches: Any, *,
                   colours: Any = None, recipe: dict | None = None,
                   n_trained: int | None = None, patches_per_s: float = 0.0,
                   grid: PatchGrid | None = None) -> Prediction:  # fmt: skip
        """Classes and entropy of ``proba`` (N, C) over ``patches`` (a store or a
        :class:`PatchSet`: ``coords``, ``patch_size_level0``, ``mpp``, ``slide_name``).
        ``n_trained``: classes seen in training (entropy is normalised by their count;
        default all of ``class_names``)."""
        proba = np.asarray(proba, dtype=np.float32)
        ok = np.isfinite(proba).all(axis=1)
        labels = np.full(proba.shape[0], -1, dtype=np.int64)
        labels[ok] = proba[ok].argmax(axis=1)
        ent = np.full(proba.shape[0], np.nan, dtype=np.float32)
        ent[ok] = entropy(proba[ok], max(2, n_trained or len(class_names)))
        return cls(
            proba=proba, labels=labels, entropy=ent, class_names=list(class_names),
            colours=None if colours is None else np.asarray(colours),
            coords=np.asarray(patches.coords, np.int64),
            patch_size_level0=int(patches.patch_size_level0),
            mpp=getattr(patches, "mpp", None),
            slide_name=getattr(patches, "slide_name", None) or "slide",
            recipe=dict(recipe or {}), complete=bool(ok.all()), patches_per_s=patches_per_s,
            _grid=grid,
        )  # fmt: skip

    @property
    def grid(self) -> PatchGrid:
        if self._grid is None:
            self._grid = patch_grid(self.coords, self.patch_size_level0, self.mpp)
        return self._grid

    def class_raster(self) -> Raster:
        """int32 class map: class ``i`` painted ``i + 1``, 0 where no patch."""
        return labels_raster(self.labels, self.grid)

    def probability_raster(self, i: int) -> Raster:
        return heatmap_raster(self.proba[:, i], self.grid)

    def entropy_raster(self) -> Raster:
        return heatmap_raster(self.entropy, self.grid)

    def rasters(self) -> dict[str, Raster]:
        """``{"classes": …, "entropy": …, "p:<class name>": probability, …}``."""
        out = {"classes": self.class_raster(), "entropy": self.entropy_raster()}
        for i, name in enumerate(self.class_names):
            out[f"p:{name}"] = self.probability_raster(i)
        return out

    def columns(self) -> dict[str, np.ndarray]:
        """The per-patch columns every table writes (see the module docstring): ``class``,
        ``class_name`` (empty where not predicted), ``prob_<class>``…, ``uncertainty``."""
        names = np.asarray([*self.class_names, ""], dtype=object)
        cols: dict[str, np.ndarray] = {"class": self.labels, "class_name": names[self.labels]}
        for i, n in enumerate(self.class_names):
            cols[prob_column(n)] = self.proba[:, i]
        cols["uncertainty"] = self.entropy
        return cols


@dataclass(eq=False)
class TrainResult:
    """What fitting a classifier returns, whatever its kind.

    Attributes:
        classifier: the fitted :class:`Classifier` (PathoTune: its best epoch's weights).
        labels: the ``PatchLabels`` it learnt from (when fitted from annotations).
        report: the linear probe's cross-validated ``CVReport`` (``None``: not asked, or
            impossible: ``notes`` says why).
        notes: human-readable remarks (skipped shapes, no cross-validation...).
        val_bal_acc: validation balanced accuracy (PathoTune: its held-out split, best epoch).
        history, best_epoch, train_indices, val_indices: PathoTune's epochs and split (indices
            into the labelled patches).
        cancelled, stopped_early: how a PathoTune run ended.
        train_patches_per_s, elapsed_s: PathoTune's training speed and time.
    """

    classifier: Any
    labels: Any = None
    report: Any = None
    notes: list[str] = field(default_factory=list)
    val_bal_acc: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    train_indices: np.ndarray | None = None
    val_indices: np.ndarray | None = None
    cancelled: bool = False
    stopped_early: bool = False
    train_patches_per_s: float = 0.0
    elapsed_s: float = 0.0
