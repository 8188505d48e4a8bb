"""Live linear-probe retraining as a job over :func:`napari_gpfm.analyses.classify.live_steps`.

``live_steps`` yields ``LiveUpdate`` records ("prediction": probe fitted and every patch
predicted, rasters ready; "report": the cross-validation; "status"/"message": why there is
nothing to train or no cross-validation). :func:`probe_job` turns each into a
:class:`Progress` (the update itself in ``data``) and returns a :class:`ProbeResult` holding
everything a dock needs to paint the class map and show the report, so callers never handle
``LiveUpdate``.

Stages: ``"training"`` (patch labels, fit, prediction of every patch; ``done`` 1) and
``"cross-validating"`` (``done`` 2); ``total`` is 2 (1 when ``cv_folds < 2``), ``unit``
"steps". Records: one ``started``, one ``running`` per prediction/report, a ``note`` per status
message, and a final ``done`` whose ``data`` is the result. Closing the generator cancels at the
next record (the inner ``live_steps`` generator is closed too).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .progress import Progress

__all__ = ["ProbeResult", "SlidePrediction", "apply_job", "probe_job"]

JOB = "probe"
TRAINING, CROSS_VALIDATING = "training", "cross-validating"


@dataclass(eq=False)
class ProbeResult:
    """What a probe run produced.

    Attributes:
        probe: the fitted ``LinearProbe`` (``None`` when fewer than two classes have labelled
            patches; ``notes`` then says why).
        labels: the ``PatchLabels`` of the store's patches (counts, conflicts, ignored).
        prediction: the ``Prediction`` of every patch of the store (``None`` untrained).
        rasters: ``{"classes", "entropy", "p:<class>", ...}`` rasters of the prediction, as
            ``napari_gpfm.layers`` paints them (``None`` untrained).
        report: the cross-validated ``CVReport`` (``None`` when ``cv_folds < 2``, untrained,
            impossible, or cancelled before it).
        notes: human-readable messages (nothing to train, no cross-validation, report notes).
    """

    probe: Any = None
    labels: Any = None
    prediction: Any = None
    rasters: dict[str, Any] | None = None
    report: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def trained(self) -> bool:
        return self.probe is not None

    @property
    def class_names(self) -> list[str]:
        return [] if self.probe is None else list(self.probe.class_names)

    @property
    def colours(self) -> Any:
        """(C, 3) RGB 0-255 of the probe's classes, or ``None``."""
        return None if self.probe is None else self.probe.colours


def _counts(labels: Any) -> str:
    if labels is None:
        return ""
    return ", ".join(f"{k} {v}" for k, v in labels.counts.items())


def _summary(result: ProbeResult) -> str:
    if not result.trained:
        return result.notes[-1] if result.notes else "nothing to train"
    text = f"linear probe on {len(result.class_names)} classes (labelled: {_counts(result.labels)})"
    if result.report is not None:
        r = result.report
        text += f"; balanced accuracy (CV, {r.folds} folds) {r.balanced_accuracy:.3f}"
    return text


def probe_job(request: Any) -> Generator[Progress, None, ProbeResult]:
    """Fit a linear probe on a store's features labelled by annotations (level-0 px), predict
    every patch and cross-validate, as :func:`~napari_gpfm.analyses.classify.live_steps` does
    for the same :class:`~napari_gpfm.analyses.classify.ProbeRequest`; yields
    :class:`Progress`, returns :class:`ProbeResult`.
    """
    from ..analyses.classify import live_steps

    cv_folds, class_names = request.cv_folds, request.class_names
    total = 2 if cv_folds >= 2 else 1
    result = ProbeResult()
    stage = TRAINING
    yield Progress(JOB, TRAINING, 0, total, status="started", unit="steps",
                   message=f"labelling patches and fitting a linear probe on "
                           f"{len(class_names)} classes")
    steps = live_steps(request)
    try:
        for update in steps:
            if update.labels is not None:
                result.labels = update.labels
            if update.kind == "prediction":
                result.probe, result.prediction = update.probe, update.prediction
                result.rasters = update.rasters
                n = int(update.prediction.labels.shape[0])
                yield Progress(JOB, TRAINING, 1, total, status="running", unit="steps",
                               data=update, message=f"labelled patches: {_counts(update.labels)};"
                                                    f" {n:,} patches predicted")
                stage = CROSS_VALIDATING
            elif update.kind == "report":
                result.report = update.report
                if update.message:
                    result.notes.append(update.message)
                r = update.report
                yield Progress(JOB, CROSS_VALIDATING, total, total, status="running",
                               unit="steps", data=update,
                               message=f"balanced accuracy (CV, {r.folds} folds): "
                                       f"{r.balanced_accuracy:.3f}")
            else:  # "status" / "message": nothing to train yet, or no cross-validation
                if update.message:
                    result.notes.append(update.message)
                yield Progress(JOB, stage, 1 if stage == CROSS_VALIDATING else 0, total,
                               status="note", unit="steps", data=update, message=update.message)
    finally:
        steps.close()
    yield Progress(JOB, stage, total, total, status="done", unit="steps", data=result,
                   message=_summary(result))
    return result


@dataclass(eq=False)
class SlidePrediction:
    """One slide's outcome of :func:`apply_job`: a prediction, or the problem in words."""

    key: Any
    name: str
    prediction: Any = None
    problem: str | None = None

    @property
    def message(self) -> str:
        if self.problem is not None:
            return f"{self.name}: {self.problem}"
        return f"{self.name}: {self.prediction.labels.shape[0]:,} patches classified."


def apply_job(classifier: Any, targets: Sequence[tuple[Any, str, Any]]
              ) -> Generator[Progress, None, list[SlidePrediction]]:  # fmt: skip
    """Apply a classifier of either kind (its ``predict_store``: a linear probe on the
    features, PathoTune on the pixels of the store's grid) to several slides' feature stores,
    one slide per record.

    ``targets`` are ``(key, slide name, store or None)``; a slide without a store, or whose
    store the classifier refuses (another model or recipe), gets its problem in words and the
    others go on. Each ``running`` record carries that slide's :class:`SlidePrediction` in
    ``data`` (stage "classifying", unit "slides"); the return value lists them all. Closing
    the generator stops before the next slide."""
    from ..errors import NapariGpfmError
    from .progress import Meter

    meter = Meter("apply", "classifying", len(targets), "slides")
    yield meter.progress(0, "started", f"classifying {len(targets)} slide(s)…")
    results: list[SlidePrediction] = []
    for i, (key, name, store) in enumerate(targets):
        if store is None:
            r = SlidePrediction(key, name, problem=NO_EMBEDDINGS)
        else:
            try:
                r = SlidePrediction(key, name, prediction=classifier.predict_store(store))
            except (NapariGpfmError, ValueError, OSError) as exc:
                r = SlidePrediction(key, name, problem=str(exc))
        results.append(r)
        yield meter.progress(i + 1, message=r.message, data=r)
    return results


NO_EMBEDDINGS = "no embeddings yet; compute them in the GPFM dock first"
