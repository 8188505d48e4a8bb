"""Linear probe on patch embeddings: fit, predict, uncertainty, cross-validation, files.

The model is ``Pipeline(StandardScaler, LogisticRegression(class_weight="balanced"))`` fitted
with lbfgs at ``tol=1e-3`` and at most ``max_iter=100`` iterations (a deliberate speed/accuracy
trade-off for live retraining: ~0.6 s for 10,000 × 1024 labelled patches on one busy core).
Prediction folds the scaler into the linear layer (``W/σ``, ``b − W·μ/σ``) and runs one float32
matrix product, so 100,000 × 1024 patches are scored in a fraction of a second.

A probe file (``.npz``, no pickle) holds the coefficients, scaler mean/scale, class names,
colours and a JSON header with the embedding recipe; its ``sha256`` covers the header (recipe,
classes count, format) and the arrays together (format ``/2``), so an edited recipe is refused
like an edited coefficient. :func:`load_probe` refuses a file whose recipe differs from the
features it would be applied to (model, encoder weights sha256, target mpp, patch size): its
coefficients would be meaningless. Files of the older format ``/1`` (sha256 of the arrays only)
still load, with a :class:`ProbeFormatWarning` (save them again to sign their header).
The file is written to a temporary name and renamed when whole; a full disk raises one
:class:`~napari_gpfm.errors.OutputWriteError` and leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from napari_gpfm.embeddings.recipe import recipe_diff
from napari_gpfm.embeddings.store import RecipeMismatchError
from napari_gpfm.errors import NapariGpfmError, OutputWriteError

from .classifier import ClassifierFileError, entropy

__all__ = [
    "RECIPE_KEYS",
    "ProbeFileError",
    "ProbeFormatWarning",
    "RecipeMismatchError",
    "LinearProbe",
    "CVReport",
    "fit_probe",
    "cv_report",
    "entropy",
    "load_probe",
]

#: Recipe keys that must match between a probe file and the features it is applied to.
RECIPE_KEYS = ("model", "weights_sha256", "target_mpp", "patch_size")
_FORMAT = "napari-gpfm-linear-probe/2"
_FORMAT_V1 = "napari-gpfm-linear-probe/1"  # sha256 of the arrays only


class ProbeFileError(ClassifierFileError):
    """A probe file is missing, unreadable or corrupt (the message names the file)."""


class ProbeFormatWarning(UserWarning):
    """A probe file of an older format, whose header (recipe) its checksum does not cover."""


# RecipeMismatchError (a probe trained on embeddings of another recipe than the features it would
# be applied to) is the embeddings' class, re-exported here: one class, one diff (recipe_diff).


def _recipe_dict(recipe: Any) -> dict:
    """Plain dict from a mapping, a dataclass or an object with ``to_dict()``."""
    if recipe is None:
        return {}
    if isinstance(recipe, Mapping):
        d = dict(recipe)
    elif hasattr(recipe, "to_dict"):
        d = dict(recipe.to_dict())
    elif dataclasses.is_dataclass(recipe):
        d = dataclasses.asdict(recipe)
    else:
        raise TypeError(f"recipe must be a dict, a dataclass or have to_dict(), got {type(recipe)}")
    return json.loads(json.dumps(d, default=str))  # JSON-safe copy


def _recipe_diff(found: Mapping, expected: Mapping) -> dict[str, tuple[Any, Any]]:
    """The :data:`RECIPE_KEYS` that differ, by the embeddings' one rule (``recipe_diff``)."""
    return recipe_diff(found, expected, RECIPE_KEYS)


@dataclass(eq=False)
class LinearProbe:
    """A fitted linear probe.

    ``class_names`` fixes the column order of :meth:`predict_proba`; ``present`` are the class
    indices seen in training (columns of absent classes are 0). ``weight``/``bias`` are the
    scaler-folded float32 parameters used for prediction; ``coef``, ``intercept``,
    ``scaler_mean``, ``scaler_scale`` the sklearn ones (``pipeline`` rebuilds the Pipeline).

    Implements :class:`~napari_gpfm.analyses.classifier.Classifier` (``kind`` ``"linear"``):
    :meth:`check_store` and :meth:`predict_store` over a feature store, :meth:`save`.
    """

    kind: ClassVar[str] = "linear"
    class_names: list[str]
    present: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    colours: np.ndarray | None = None
    recipe: dict = dataclasses.field(default_factory=dict)
    n_train: int = 0

    def __post_init__(self) -> None:
        coef = np.asarray(self.coef, dtype=np.float64)
        scale = np.asarray(self.scaler_scale, dtype=np.float64)
        w = coef / scale
        self.weight = np.ascontiguousarray(w.T.astype(np.float32))  # (D, C')
        self.bias = (np.asarray(self.intercept, np.float64) - w @ self.scaler_mean).astype(
            np.float32
        )

    @property
    def n_features(self) -> int:
        return int(self.scaler_mean.shape[0])

    @property
    def pipeline(self):
        """An equivalent fitted sklearn Pipeline(StandardScaler, LogisticRegression)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler()
        scaler.mean_ = np.asarray(self.scaler_mean, np.float64)
        scaler.scale_ = np.asarray(self.scaler_scale, np.float64)
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = self.n_features
        scaler.n_samples_seen_ = self.n_train
        lr = LogisticRegression(class_weight="balanced")
        lr.coef_ = np.asarray(self.coef, np.float64)
        lr.intercept_ = np.asarray(self.intercept, np.float64)
        lr.classes_ = np.asarray(self.present)
        lr.n_features_in_ = self.n_features
        return Pipeline([("scaler", scaler), ("logreg", lr)])

    def _check(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"features must be (N, {self.n_features}), got shape {X.shape}")
        return X

    def predict_proba(self, X: np.ndarray, batch: int = 65_536) -> np.ndarray:
        """(N, n_classes) float32 class probabilities (columns follow ``class_names``)."""
        X = self._check(X)
        out = np.zeros((X.shape[0], len(self.class_names)), dtype=np.float32)
        for s in range(0, X.shape[0], batch):
            z = X[s : s + batch] @ self.weight + self.bias
            if z.shape[1] == 1:  # binary logistic regression: one logit for present[1]
                p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
                p = np.stack([1.0 - p1, p1], axis=1)
            else:
                z -= z.max(axis=1, keepdims=True)
                np.exp(z, out=z)
                p = z / z.sum(axis=1, keepdims=True)
            out[s : s + batch, self.present] = p
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(N,) int64 index into ``class_names`` of the most likely class."""
        return self.predict_proba(X).argmax(axis=1)

    def entropy(self, X: np.ndarray, normalised: bool = True) -> np.ndarray:
        """(N,) predictive entropy of the features' class probabilities (see :func:`entropy`)."""
        return entropy(self.predict_proba(X), len(self.present) if normalised else None)

    # --- files -------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "coef": np.asarray(self.coef, np.float64),
            "intercept": np.asarray(self.intercept, np.float64),
            "scaler_mean": np.asarray(self.scaler_mean, np.float64),
            "scaler_scale": np.asarray(self.scaler_scale, np.float64),
            "present": np.asarray(self.present, np.int64),
            "class_names": np.asarray(self.class_names, dtype=str),
        }
        if self.colours is not None:
            arrays["colours"] = np.asarray(self.colours, np.float64)
        return arrays

    @staticmethod
    def _digest(arrays: Mapping[str, np.ndarray], header: Mapping[str, Any] | None = None) -> str:
        """sha256 of the arrays (name, dtype, shape, bytes) and, from format /2 on, of the
        header (canonical JSON, without its ``sha256``) before them."""
        h = hashlib.sha256()
        if header is not None:
            h.update(_canonical_header(header).encode())
        for key in sorted(arrays):
            h.update(key.encode())
            a = np.ascontiguousarray(arrays[key])
            if header is not None:
                h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    # --- the Classifier protocol ---------------------------------------------------------------
    def check_store(self, store: Any, source: str | os.PathLike | None = None,
                    assume_model: str | None = None) -> None:  # fmt: skip
        """Refuse ``store`` unless its features are of this probe's recipe
        (:func:`napari_gpfm.analyses.classify.check_recipe`)."""
        from .classify import check_recipe

        check_recipe(self, store, source, assume_model)

    def predict_store(self, store: Any, assume_model: str | None = None) -> Any:
        """The :class:`~napari_gpfm.analyses.classifier.Prediction` of every patch of
        ``store``: refused when the recipes differ (:meth:`check_store`, ``assume_model`` for
        files recording no model) and when the features hold NaN or inf
        (:class:`~napari_gpfm.embeddings.store.NonFiniteFeaturesError` naming the store: their
        probabilities would be NaN)."""
        from .classify import predict_features, require_finite

        self.check_store(store, assume_model=assume_model)
        require_finite(store)
        return predict_features(self, store.features, store)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the probe to ``path`` (an ``.npz`` file, written as named) and return it.

        Written to a temporary file beside ``path``, forced to disk and renamed: a full disk
        raises :class:`~napari_gpfm.errors.OutputWriteError` naming ``path`` and the previous
        file stays untouched."""
        arrays = self._arrays()
        header = {"format": _FORMAT, "recipe": self.recipe, "n_train": self.n_train}
        header["sha256"] = self._digest(arrays, header)
        write_atomic(path, lambda fh: np.savez(fh, header=np.asarray(json.dumps(header)),
                                               **arrays))  # fmt: skip
        return Path(path)


def _canonical_header(header: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True,
                      separators=(",", ":"), default=str)  # fmt: skip


def write_atomic(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(file object)`` on a temporary file beside ``path``, force it to disk and
    rename it to ``path``. On failure the temporary file is removed and the previous ``path``
    is untouched; an I/O failure (disk full, I/O error, no permission) raises
    :class:`~napari_gpfm.errors.OutputWriteError` naming ``path``."""
    final = os.fspath(path)
    folder, name = os.path.split(final)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    kept = (f"the previous {name} is untouched" if os.path.exists(final)
            else "no output was left behind")  # fmt: skip
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, NapariGpfmError):
            raise OutputWriteError(final, exc.errno or errno.EIO, kept) from exc
        raise


@dataclass(frozen=True)
class CVReport:
    """Stratified cross-validation of a probe on pooled out-of-fold predictions."""

    balanced_accuracy: float
    per_class_recall: dict[str, float]
    confusion: np.ndarray  # (C, C) rows = true, cols = predicted, over ``class_names``
    class_names: list[str]
    folds: int
    fold_balanced_accuracy: list[float]
    note: str = ""


def _encode_labels(y: Sequence, class_names: Sequence[str]) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind in "iu":
        codes = y.astype(np.int64)
        if codes.size and codes.max() >= len(class_names):
            raise ValueError(
                f"label {codes.max()} has no class name (classes: {list(class_names)})"
            )
        return codes
    lookup = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({str(v) for v in y.tolist()} - set(lookup))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {list(class_names)}")
    return np.array([lookup[str(v)] for v in y.tolist()], dtype=np.int64)


def _fit_arrays(X: np.ndarray, codes: np.ndarray, C: float, max_iter: int, init=None):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(
        C=C, class_weight="balanced", max_iter=max_iter, tol=1e-3, warm_start=init is not None
    )
    if init is not None:
        lr.coef_, lr.intercept_ = init
    pipe = Pipeline([("scaler", StandardScaler()), ("logreg", lr)])
    with warnings.catch_warnings():
        # a capped iteration count is a deliberate speed/accuracy trade-off for live use
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(X, codes)
    return pipe


def fit_probe(
    X: np.ndarray,
    y: Sequence,
    class_names: Sequence[str],
    colours: np.ndarray | Sequence | None = None,
    recipe: Any = None,
    C: float = 1.0,
    max_iter: int = 100,
    previous: LinearProbe | None = None,
    why: Sequence[str] = (),
) -> LinearProbe:
    """Fit a linear probe.

    ``y`` holds class indices into ``class_names`` or class names; index ``-1`` marks
    unlabelled rows, which are skipped. At least two classes must be present. ``previous``
    (a probe with the same classes and dimension) starts lbfgs from its coefficients; this is
    not always faster (``bench/bench_analyses.py`` measured it slower after relabelling on
    near-separable data), so it is off unless asked for. ``recipe`` (the embedding recipe, dict
    or dataclass) is stored with the probe and checked by :func:`load_probe`. ``why``: the
    reasons classes have no labelled patch (``annotations.labels.unlabelled_reasons``), added
    to the error raised when fewer than two classes have labelled patches.
    """
    X = np.asarray(X, dtype=np.float32)
    codes = _encode_labels(y, class_names)
    if X.ndim != 2 or X.shape[0] != codes.shape[0]:
        raise ValueError(
            f"X must be (N, D) with one label per row; got X {X.shape}, y {codes.shape}"
        )
    keep = codes >= 0
    X, codes = X[keep], codes[keep]
    present = np.unique(codes)
    if present.size < 2:
        names = [class_names[i] for i in present]
        raise ValueError(
            f"a probe needs labelled patches of at least two classes, got {names or 'none'}"
            + "".join(f"; {w}" for w in why)
        )
    init = None
    if (
        previous is not None
        and np.array_equal(previous.present, present)
        and previous.n_features == X.shape[1]
    ):
        init = (np.array(previous.coef, np.float64), np.array(previous.intercept, np.float64))
    pipe = _fit_arrays(X, codes, C, max_iter, init)
    scaler, lr = pipe.named_steps["scaler"], pipe.named_steps["logreg"]
    return LinearProbe(
        class_names=list(class_names),
        present=present.astype(np.int64),
        coef=lr.coef_.copy(),
        intercept=lr.intercept_.copy(),
        scaler_mean=scaler.mean_.copy(),
        scaler_scale=scaler.scale_.copy(),
        colours=None if colours is None else np.asarray(colours, dtype=np.float64),
        recipe=_recipe_dict(recipe),
        n_train=int(X.shape[0]),
    )


def cv_report(
    X: np.ndarray,
    y: Sequence,
    folds: int = 5,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    C: float = 1.0,
    max_iter: int = 100,
) -> CVReport:
    """Stratified k-fold CV: balanced accuracy, per-class recall and confusion matrix.

    ``y`` as in :func:`fit_probe`; without ``class_names`` the classes are the sorted distinct
    names in ``y`` (or "0", "1", … for integer labels).

    When the rarest class has fewer labelled patches than ``folds``, the number of folds is
    reduced to that count and ``note`` says so; a class with a single labelled patch cannot be
    cross-validated and raises ``ValueError`` naming it.
    """
    from sklearn.model_selection import StratifiedKFold

    X = np.asarray(X, dtype=np.float32)
    if class_names is None:
        ya = np.asarray(y)
        if ya.dtype.kind in "iu":
            class_names = [str(i) for i in range(int(ya.max()) + 1)]
        else:
            class_names = sorted({str(v) for v in ya.tolist()})
    codes = _encode_labels(y, class_names)
    keep = codes >= 0
    X, codes = X[keep], codes[keep]
    present, counts = np.unique(codes, return_counts=True)
    if present.size < 2:
        raise ValueError("cross-validation needs labelled patches of at least two classes")
    rarest = int(counts.argmin())
    rare_name, rare_n = class_names[present[rarest]], int(counts[rarest])
    if rare_n < 2:
        raise ValueError(
            f"class {rare_name!r} has only {rare_n} labelled patch; "
            "label at least 2 to cross-validate"
        )
    note = ""
    if rare_n < folds:
        note = (
            f"reduced folds from {folds} to {rare_n}: "
            f"class {rare_name!r} has only {rare_n} labelled patches"
        )
        folds = rare_n
    pred = np.empty_like(codes)
    fold_scores = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, codes):
        pipe = _fit_arrays(X[train], codes[train], C, max_iter)
        pred[test] = pipe.predict(X[test])
        fold_scores.append(balanced_accuracy(codes[test], pred[test], present))
    n_cls = len(class_names)
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(confusion, (codes, pred), 1)
    recall = {class_names[c]: float(confusion[c, c] / confusion[c].sum()) for c in present}
    return CVReport(
        balanced_accuracy=float(np.mean(list(recall.values()))),
        per_class_recall=recall,
        confusion=confusion,
        class_names=list(class_names),
        folds=folds,
        fold_balanced_accuracy=fold_scores,
        note=note,
    )


def balanced_accuracy(true: np.ndarray, pred: np.ndarray, classes: np.ndarray | None = None) -> float:
    """Mean per-class recall over ``classes`` (default: those in ``true``) present in ``true``;
    NaN when none is."""
    true, pred = np.asarray(true), np.asarray(pred)
    classes = np.unique(true) if classes is None else classes
    rec = [np.mean(pred[true == c] == c) for c in classes if np.any(true == c)]
    return float(np.mean(rec)) if rec else float("nan")


def load_probe(path: str | os.PathLike, expected_recipe: Any = None) -> LinearProbe:
    """Read a probe file; refuse it when its recipe differs from ``expected_recipe``.

    Only the keys in :data:`RECIPE_KEYS` that ``expected_recipe`` provides are compared (with
    :func:`~napari_gpfm.embeddings.recipe.recipe_diff`: floats rounded to 6 decimals). Raises
    :class:`ProbeFileError` for unreadable or corrupt files and :class:`RecipeMismatchError`
    naming the file and each differing key.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ProbeFileError(path, "probe file not found") from None
    except Exception as exc:  # zip/npz format errors
        raise ProbeFileError(path, f"not a readable probe file ({exc})") from exc
    try:
        header = json.loads(str(data.pop("header")))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ProbeFileError(path, "probe header missing or unreadable") from exc
    if not isinstance(header, dict):
        raise ProbeFileError(path, "probe header missing or unreadable")
    fmt = header.get("format")
    if fmt == _FORMAT:
        if LinearProbe._digest(data, header) != header.get("sha256"):
            raise ProbeFileError(
                path, "the probe's header (recipe, format) and arrays do not match their "
                "sha256: the file is corrupt or was edited; train the classifier again"
            )
    elif fmt == _FORMAT_V1:
        if LinearProbe._digest(data) != header.get("sha256"):
            raise ProbeFileError(
                path, "probe arrays do not match their sha256 (file corrupt or edited)"
            )
        warnings.warn(
            f"{path}: an older classifier file ({_FORMAT_V1}) whose checksum covers its arrays "
            "but not its header (recipe): an edited recipe cannot be detected. Load and save "
            "it again to sign both",
            ProbeFormatWarning,
            stacklevel=2,
        )
    else:
        raise ProbeFileError(path, f"unknown probe format {fmt!r} (expected {_FORMAT})")
    missing = [k for k in ("class_names", "present", "coef", "intercept", "scaler_mean",
                           "scaler_scale") if k not in data]  # fmt: skip
    if missing:
        raise ProbeFileError(path, f"probe arrays missing: {', '.join(missing)}")
    recipe = header.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise ProbeFileError(path, f"the probe's recipe is not a mapping: {recipe!r}")
    if expected_recipe is not None:
        diff = _recipe_diff(recipe, _recipe_dict(expected_recipe))
        if diff:
            lines = "; ".join(
                f"{k}: file has {a!r}, features have {b!r}" for k, (a, b) in diff.items()
            )
            raise RecipeMismatchError(
                path, diff,
                f"this probe was trained on embeddings of another recipe ({lines}); "
                "retrain it on these features or embed the slide with the probe's recipe",
            )
    return LinearProbe(
        class_names=[str(s) for s in data["class_names"].tolist()],
        present=data["present"],
        coef=data["coef"],
        intercept=data["intercept"],
        scaler_mean=data["scaler_mean"],
        scaler_scale=data["scaler_scale"],
        colours=data.get("colours"),
        recipe=recipe,
        n_train=int(header.get("n_train", 0)),
    )


def holdout_balanced_accuracy(
    X: np.ndarray,
    y: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    class_names: Sequence[str],
) -> float | None:
    """Balanced accuracy of a linear probe fitted on ``train_idx`` and scored on ``val_idx``:
    lets another classifier's validation score be compared on exactly the same split.
    None when the split has no validation patches or fewer than two training classes."""
    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    y = np.asarray(y)
    if val_idx.size == 0 or len(np.unique(y[train_idx])) < 2:
        return None
    probe = fit_probe(X[train_idx], y[train_idx], class_names)
    return balanced_accuracy(y[val_idx], probe.predict(X[val_idx]))
