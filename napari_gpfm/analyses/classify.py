"""Linear-probe classifiers from a pathologist's annotations on feature stores, headless.

The flow the widget and the CLI share::

    labels = labels_for_store(annotations, store, class_names)        # shapes -> patch labels
    result = train_probe(annotations, store, class_names, colours)    # linear probe + CV
    result.classifier.save("tumour.probe.npz")                      # bound to the store's recipe
    pred = load_classifier("tumour.probe.npz").predict_store(store)  # refuses other recipes
    write_outputs(pred, "out/")                                     # GeoJSON + per-patch CSV/HDF5

(``load_classifier`` is :func:`napari_gpfm.jobs.classifiers.load_classifier`, which reads both
classifier kinds; the probe and PathoTune share :mod:`napari_gpfm.analyses.classifier`:
``Prediction``, ``TrainResult`` and the per-patch column names ``prob_<class>``.)

:func:`live_steps` is the generator behind the widget's live retraining: it yields the new class
map and probability rasters first (labels + fit + predict + rasters, well under a second for
10,000 labelled and 100,000 predicted patches, see ``bench/bench_probe_live.py``) and the
cross-validated report after, so the viewer repaints before the slower cross-validation.
No napari, Qt or torch here.

Nothing silently wrong: features holding NaN or inf are refused naming the store
(:class:`~napari_gpfm.embeddings.store.NonFiniteFeaturesError`); features from another tool
that record no model (no ``encoder`` attribute) are refused for a classifier bound to a model
unless the caller says which model made them (``assume_model=``, ``--assume-model``), with an
:class:`~napari_gpfm.embeddings.store.ExternalFeaturesWarning` saying what cannot be checked.
:func:`write_outputs` writes every file to a temporary name and renames them all only when all
are whole: a full disk raises one :class:`~napari_gpfm.errors.OutputWriteError` and leaves the
previous outputs untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
import warnings
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..annotations.geojson import Annotation, class_polygons, patch_features, write_geojson
from ..embeddings.store import ExternalFeaturesWarning, StoreError, atomic_h5
from ..errors import NapariGpfmError, OutputWriteError
from ..annotations.labels import PatchLabels, labels_from_annotations, unlabelled_reasons
from .classifier import Prediction, TrainResult, prob_column
from .export import write_csv
from .heatmap import PatchGrid, Raster
from .probe import (
    CVReport,
    LinearProbe,
    RecipeMismatchError,
    _recipe_diff,
    _recipe_dict,
    cv_report,
    fit_probe,
)

__all__ = [
    "UnknownFeatureModelError",
    "LiveUpdate",
    "ProbeRequest",
    "store_recipe",
    "store_geometry",
    "labels_for_store",
    "merge_labels",
    "train_probe",
    "check_recipe",
    "require_finite",
    "predict_features",
    "live_steps",
    "write_outputs",
]


# --- stores ------------------------------------------------------------------------------------


class UnknownFeatureModelError(StoreError, ValueError):
    """Features from another tool record no model (no ``encoder`` attribute), so a classifier
    bound to a model cannot be checked against them: say which model made them
    (``assume_model=`` / ``--assume-model``)."""


def store_recipe(store: Any, assume_model: str | None = None) -> dict:
    """The store's embedding recipe as a dict (for external files: what is known, the model;
    ``assume_model`` for one that records none, see :func:`feature_model`)."""
    recipe = getattr(store, "recipe", None)
    if recipe is not None:
        return _recipe_dict(recipe)
    model = getattr(store, "model", None) or assume_model
    return {"model": model} if model else {}


def _store_name(store: Any) -> str:
    return str(getattr(store, "path", None) or "these features")


def feature_model(store: Any, assume_model: str | None = None, need: bool = True,
                  what: str = "a classifier") -> str | None:  # fmt: skip
    """The model that made ``store``'s features: recorded, or ``assume_model`` for files of
    another tool that record none (with an :class:`ExternalFeaturesWarning`).

    Raises :class:`UnknownFeatureModelError` naming the store when the file records no model,
    none is assumed and ``need`` (a classifier bound to a model), and ``ValueError`` when
    ``assume_model`` contradicts the recorded model.
    """
    recorded = getattr(store, "model", None) or store_recipe(store).get("model")
    name = _store_name(store)
    if recorded:
        if assume_model and str(assume_model) != str(recorded):
            raise UnknownFeatureModelError(
                name, f"records model {recorded!r}; --assume-model {assume_model!r} "
                      "contradicts it (it is only for files that record no model)")  # fmt: skip
        if getattr(store, "is_external", False):
            warnings.warn(
                f"{name}: features from another tool (model {recorded!r} as recorded); their "
                "weights and tiling are not recorded and cannot be checked",
                ExternalFeaturesWarning, stacklevel=3,
            )  # fmt: skip
        return str(recorded)
    if assume_model:
        warnings.warn(
            f"{name}: the file records no model; assuming the features were made by "
            f"{assume_model!r} (--assume-model). Their weights and tiling cannot be checked",
            ExternalFeaturesWarning, stacklevel=3,
        )  # fmt: skip
        return str(assume_model)
    if need:
        raise UnknownFeatureModelError(
            name,
            "records no model (no 'encoder' attribute): features from another tool, whose "
            f"model is unknown, so {what} cannot be checked against them. If you know which "
            "model made them, say so: --assume-model NAME (assume_model='NAME')",
        )
    return None


def store_geometry(store: Any) -> tuple[np.ndarray, int, float | None]:
    """(coords (N, 2) int64 level-0 top-left, patch side in level-0 px, mpp) of a store."""
    coords = getattr(store, "coords", None)
    P = getattr(store, "patch_size_level0", None)
    if coords is None or P is None:
        raise ValueError(
            f"{getattr(store, 'path', store)}: the feature file has no patch coordinates or "
            "patch size, so annotations cannot be matched to its patches"
        )
    return np.asarray(coords, dtype=np.int64), int(P), getattr(store, "mpp", None)


# --- labels ------------------------------------------------------------------------------------


def labels_for_store(
    annotations: Iterable[Annotation],
    store: Any,
    class_names: Sequence[str] | None = None,
    min_fraction: float = 0.5,
) -> PatchLabels:
    """Patch labels of ``store``'s patches from annotations (see ``labels_from_annotations``)."""
    coords, P, _ = store_geometry(store)
    return labels_from_annotations(annotations, coords, P, class_names, min_fraction)


def _remap(labels: np.ndarray, from_names: Sequence[str], to_names: Sequence[str]) -> np.ndarray:
    lookup = np.array([list(to_names).index(n) if n in to_names else -1 for n in from_names]
                      + [-1], dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    return lookup[np.where(lab >= 0, lab, len(from_names))]


def merge_labels(first: PatchLabels, second: PatchLabels) -> PatchLabels:
    """Labels from two sources (shapes and a painted Labels layer) over the same patches.

    Classes follow ``first``; where both label a patch with different classes it becomes a
    conflict (unlabelled); a patch ignored by either is ignored.
    """
    names = list(first.class_names)
    b = _remap(second.labels, second.class_names, names)
    a = first.labels
    labels = np.where(a >= 0, a, b)
    clash = (a >= 0) & (b >= 0) & (a != b)
    labels[clash] = -1
    ignored = first.ignored | second.ignored
    labels[ignored] = -1
    conflicts = np.union1d(first.conflicts, np.union1d(second.conflicts, np.nonzero(clash)[0]))
    cc = {int(i): c for i, c in zip(first.conflicts, first.conflict_classes)}
    for i, c in zip(second.conflicts, second.conflict_classes):
        cc.setdefault(int(i), c)
    for i in np.nonzero(clash)[0]:
        cc[int(i)] = [names[a[i]], names[b[i]]]
    fractions = first.fractions.copy()
    for j, n in enumerate(second.class_names):
        if n in names:
            fractions[:, names.index(n)] = np.maximum(fractions[:, names.index(n)],
                                                      second.fractions[:, j])
    return PatchLabels(
        labels=labels, fractions=fractions, class_names=names,
        conflicts=conflicts.astype(np.int64),
        conflict_classes=[cc.get(int(i), []) for i in conflicts],
        ignored=ignored,
        excluded_classes=sorted(set(first.excluded_classes) | set(second.excluded_classes)),
        skipped=list(first.skipped) + list(second.skipped),
    )


# --- training --------------------------------------------------------------------------------


def _class_setup(
    labels: PatchLabels, class_names: Sequence[str] | None, colours: Any
) -> tuple[list[str], np.ndarray | None]:
    names = list(labels.class_names if class_names is None else class_names)
    col = None if colours is None else np.asarray(colours, dtype=np.float64).reshape(-1, 3)
    if col is not None and len(col) != len(names):
        raise ValueError(f"{len(col)} colours for {len(names)} classes {names}")
    return names, col


def train_probe(
    annotations: Iterable[Annotation],
    store: Any,
    class_names: Sequence[str] | None = None,
    colours: Any = None,
    min_fraction: float = 0.5,
    cv_folds: int = 5,
    seed: int = 0,
    extra_labels: PatchLabels | None = None,
    assume_model: str | None = None,
) -> TrainResult:
    """Fit a linear probe on ``store``'s features labelled by ``annotations``.

    ``class_names`` (default: classes met, ``Ignore*`` left out) fixes the probe's classes and
    order; ``colours`` (C, 3) RGB 0-255 travel in the classifier file. ``extra_labels`` (from a
    painted Labels layer) are merged in. ``cv_folds`` ≥ 2 adds a stratified cross-validated
    report (balanced accuracy, per-class recall, confusion); when that is impossible (a class
    with one labelled patch) the reason is in ``notes``. Raises ``ValueError`` when fewer than
    two classes have labelled patches, :class:`NonFiniteFeaturesError` (naming the store) for
    NaN/inf features, and :class:`UnknownFeatureModelError` for another tool's file recording
    no model unless ``assume_model`` names it (recorded in the classifier). The
    :class:`~napari_gpfm.analyses.classifier.TrainResult` holds the probe as ``classifier``.
    """
    feature_model(store, assume_model, what="a classifier trained on them")
    require_finite(store)
    labels = labels_for_store(annotations, store, class_names, min_fraction)
    if extra_labels is not None:
        labels = merge_labels(labels, extra_labels)
    names, col = _class_setup(labels, class_names, colours)
    X = store.features
    probe = fit_probe(X, labels.labels, names, colours=col,
                      recipe=store_recipe(store, assume_model),
                      why=unlabelled_reasons(labels, names))  # fmt: skip
    notes = list(labels.skipped)
    report = None
    if cv_folds >= 2:
        try:
            report = cv_report(X, labels.labels, folds=cv_folds, seed=seed, class_names=names)
            if report.note:
                notes.append(report.note)
        except ValueError as exc:
            notes.append(f"no cross-validation: {exc}")
    return TrainResult(probe, labels, report, notes,
                       val_bal_acc=None if report is None else report.balanced_accuracy)


# --- applying ----------------------------------------------------------------------------------


def require_finite(store: Any) -> None:
    """NonFiniteFeaturesError naming the store when its features hold NaN or inf."""
    check = getattr(store, "require_finite", None)
    if check is not None:
        check()
    else:
        from ..embeddings.store import check_finite

        check_finite(store.features, _store_name(store))


def check_recipe(probe: LinearProbe, store: Any, source: str | os.PathLike | None = None,
                 assume_model: str | None = None) -> None:  # fmt: skip
    """Raise :class:`RecipeMismatchError` when ``store``'s features are not the probe's kind.

    The error names ``source`` (the classifier file) when given, else the store's file. A file
    of another tool that records no model is refused (:class:`UnknownFeatureModelError`) for a
    probe bound to a model unless ``assume_model`` names the model that made it (then checked
    like a recorded one, with an :class:`ExternalFeaturesWarning`).
    """
    feature_model(store, assume_model, need=bool((probe.recipe or {}).get("model")),
                  what=f"the classifier{f' {source}' if source else ''} (trained on "
                       f"{(probe.recipe or {}).get('model')} features)")  # fmt: skip
    expected = store_recipe(store, assume_model)
    store_file = getattr(store, "path", None)
    refused = source if source is not None else (store_file or "features")
    features = store_file if source is not None and store_file else "these features"
    diff = _recipe_diff(probe.recipe or {}, expected)
    if diff:
        lines = "; ".join(f"{k}: classifier has {a!r}, features have {b!r}"
                          for k, (a, b) in diff.items())
        raise RecipeMismatchError(
            refused, diff,
            f"the classifier was trained on embeddings of another model or recipe than "
            f"{features} ({lines}); retrain it on these features or embed the slide with the "
            "classifier's model and tiling",
        )
    if probe.n_features != store.embed_dim:
        raise RecipeMismatchError(
            refused, {"embed_dim": (probe.n_features, store.embed_dim)},
            f"the classifier expects {probe.n_features}-d features, {features} have "
            f"{store.embed_dim}-d",
        )


def predict_features(probe: LinearProbe, X: np.ndarray, patches: Any,
                     grid: PatchGrid | None = None) -> Prediction:  # fmt: skip
    """Apply a probe to features ``X`` (one row per patch of ``patches``: a store or a
    ``PatchSet``); no recipe check (:meth:`LinearProbe.predict_store` checks it for stores)."""
    return Prediction.from_proba(
        probe.predict_proba(X), probe.class_names, patches, colours=probe.colours,
        recipe=probe.recipe, n_trained=len(probe.present), grid=grid,
    )


# --- live retraining ---------------------------------------------------------------------------


@dataclass(eq=False)
class LiveUpdate:
    """One step of :func:`live_steps`: ``kind`` is "prediction", "report" or "status"."""

    kind: str
    labels: PatchLabels | None = None
    probe: LinearProbe | None = None
    prediction: Prediction | None = None
    rasters: dict[str, Raster] | None = None
    report: CVReport | None = None
    message: str = ""


@dataclass(frozen=True, eq=False)
class ProbeRequest:
    """What a live probe run learns from (the widget gathers it; :func:`live_steps` and
    :func:`napari_gpfm.jobs.probe.probe_job` take it).

    Attributes:
        annotations: the shapes, in level-0 pixels.
        store: the slide's feature store.
        class_names: the classes in palette order (no ``Ignore*``).
        colours: (C, 3) RGB 0-255 of ``class_names``, or ``None``.
        min_fraction: share of a patch a class's shapes must cover to label it.
        extra_labels: the ``PatchLabels`` of a painted Labels layer, merged in.
        cv_folds: cross-validation folds (< 2: none).
        seed: of the cross-validation split.
    """

    annotations: Sequence[Annotation]
    store: Any
    class_names: Sequence[str]
    colours: Any = None
    min_fraction: float = 0.5
    extra_labels: PatchLabels | None = None
    cv_folds: int = 5
    seed: int = 0


def live_steps(request: ProbeRequest) -> Generator[LiveUpdate, None, None]:
    """Retrain and repaint after an annotation edit; each ``yield`` is a cancel point.

    Yields a "status" update when there is nothing to train yet (fewer than two classes with
    labelled patches), else a "prediction" (probe, labels, prediction, rasters) and then a
    "report" (cross-validation, or a "status" saying why there is none).
    """
    store, names, cv_folds = request.store, list(request.class_names), request.cv_folds
    labels = labels_for_store(request.annotations, store, names, request.min_fraction)
    if request.extra_labels is not None:
        labels = merge_labels(labels, request.extra_labels)
    counts = labels.counts
    if sum(1 for v in counts.values() if v > 0) < 2:
        yield LiveUpdate("status", labels=labels, message=(
            "label patches of at least two classes to train (labelled: "
            + (", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none") + ")"
            + "".join(f"; {w}" for w in unlabelled_reasons(labels, names))
        ))
        return
    _, col = _class_setup(labels, names, request.colours)
    require_finite(store)
    X = store.features
    probe = fit_probe(X, labels.labels, names, colours=col, recipe=store_recipe(store))
    pred = predict_features(probe, X, store)
    rasters = pred.rasters()
    yield LiveUpdate("prediction", labels=labels, probe=probe, prediction=pred, rasters=rasters)
    if cv_folds < 2:
        return
    try:
        report = cv_report(X, labels.labels, folds=cv_folds, seed=request.seed,
                           class_names=names)
    except ValueError as exc:
        yield LiveUpdate("status", labels=labels, message=f"no cross-validation: {exc}")
        return
    yield LiveUpdate("report", labels=labels, report=report, message=report.note)


# --- outputs -----------------------------------------------------------------------------------


def _rgb(colours: np.ndarray | None, n: int) -> np.ndarray | None:
    return None if colours is None else np.asarray(colours, dtype=np.float64).reshape(n, 3)


def write_outputs(
    prediction: Prediction,
    out_dir: str | os.PathLike,
    per_patch: bool = False,
    tables: Sequence[str] = ("csv", "h5"),
    name: str | None = None,
) -> dict[str, Path]:
    """Write a slide's predictions into ``out_dir``; returns ``{kind: path}``.

    - ``<name>.geojson``: one QuPath annotation per predicted class, the patch squares merged
      into (Multi)Polygons with holes, with measurements ``Area µm^2`` (``Area px^2`` without
      mpp), ``Num patches`` and ``Mean probability``; with ``per_patch`` one QuPath detection
      per patch instead, with ``prob_<class>``… and ``uncertainty`` measurements.
    - ``<name>_patches.csv``: ``x, y`` (level-0 top-left), ``class``, ``class_name``,
      ``prob_<class>``…, ``uncertainty`` (:meth:`Prediction.columns`).
    - ``<name>_patches.h5``: datasets ``coords``, ``probabilities``, ``labels``,
      ``uncertainty``; attrs ``class_names``, ``colours`` and ``recipe`` (JSON),
      ``patch_size_level0``, ``mpp``.

    All or nothing: each file is written to a temporary name in ``out_dir`` and they are renamed
    to their names only once all are whole (and on disk). A full disk, an I/O error or a
    missing permission raises one :class:`~napari_gpfm.errors.OutputWriteError` naming the file
    that failed; the temporary files are removed and the previous outputs are untouched.
    """
    out = Path(out_dir)
    name = name or prediction.slide_name
    p = prediction
    finals = {"geojson": out / f"{name}.geojson"}
    if "csv" in tables:
        finals["csv"] = out / f"{name}_patches.csv"
    if "h5" in tables:
        finals["h5"] = out / f"{name}_patches.h5"
    token = uuid.uuid4().hex[:8]
    tmps = {k: v.with_name(f".{v.stem}.{token}.tmp{v.suffix}") for k, v in finals.items()}
    current = finals["geojson"]
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputWriteError(out, exc.errno or errno.EIO, "nothing was written") from exc
        current = finals["geojson"]
        write_geojson(tmps["geojson"], _prediction_annotations(p, per_patch))
        if "csv" in finals:
            current = finals["csv"]
            write_csv(tmps["csv"], p.coords, p.columns())
        if "h5" in finals:
            current = finals["h5"]
            _write_prediction_h5(tmps["h5"], p)
        for k in finals:  # everything is whole: on disk before any name changes
            current = finals[k]
            _fsync_file(tmps[k])
        for k in finals:
            current = finals[k]
            os.replace(tmps[k], finals[k])
    except BaseException as exc:
        for tmp in tmps.values():
            for leftover in (tmp, Path(f"{tmp}.part")):  # write_geojson's own temporary
                with contextlib.suppress(OSError):
                    leftover.unlink()
        if isinstance(exc, OutputWriteError):
            if exc.path in tmps.values():  # name the output, not its temporary file
                raise OutputWriteError(current, exc.errno, _kept(finals)) from exc
            raise
        if isinstance(exc, OSError) and not isinstance(exc, NapariGpfmError):
            raise OutputWriteError(current, exc.errno or errno.EIO, _kept(finals)) from exc
        raise
    return dict(finals)


def _kept(finals: dict[str, Path]) -> str:
    old = [p.name for p in finals.values() if p.exists()]
    if old:
        return f"no output was changed (the previous {', '.join(old)} are untouched)"
    return "no output was left behind"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prediction_annotations(p: Prediction, per_patch: bool) -> list:
    C = len(p.class_names)
    rgb = _rgb(p.colours, C)
    if per_patch:
        cols = p.columns()
        meas = {k: v for k, v in cols.items() if k not in ("class", "class_name")}
        return patch_features(p.coords, p.patch_size_level0, meas, p.labels, p.class_names, rgb)
    anns = class_polygons(p.class_raster(), p.class_names, rgb)
    for a in anns:
        i = p.class_names.index(a.class_name)
        sel = p.labels == i
        area = a.area * (p.mpp**2 if p.mpp else 1.0)
        a.properties["measurements"] = {
            ("Area µm^2" if p.mpp else "Area px^2"): float(area),
            "Num patches": int(sel.sum()),
            "Mean probability": float(p.proba[sel, i].mean()) if sel.any() else 0.0,
        }
    return anns


def _write_prediction_h5(path: Path, p: Prediction) -> None:
    """The per-patch HDF5 table, written whole through :func:`atomic_h5` (a full disk raises
    OutputWriteError; HDF5 never sees a failed close, so nothing crashes)."""
    rgb = _rgb(p.colours, len(p.class_names))
    with atomic_h5(path) as f:
        f.create_dataset("coords", data=p.coords.astype(np.int64))
        f.create_dataset("probabilities", data=p.proba.astype(np.float32))
        f.create_dataset("labels", data=p.labels.astype(np.int64))
        f.create_dataset("uncertainty", data=p.entropy.astype(np.float32))
        f.attrs["class_names"] = json.dumps(p.class_names)
        f.attrs["probability_columns"] = json.dumps([prob_column(n) for n in p.class_names])
        f.attrs["colours"] = json.dumps(None if rgb is None else rgb.tolist())
        f.attrs["recipe"] = json.dumps(p.recipe, default=str)
        f.attrs["patch_size_level0"] = int(p.patch_size_level0)
        f.attrs["mpp"] = float(p.mpp) if p.mpp else float("nan")
