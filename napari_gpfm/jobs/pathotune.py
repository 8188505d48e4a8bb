"""PathoTune on a slide's annotations as a job: backbone → labels → read → train → predict.

The body the 'PathoTune' dock runs in a worker, headless: :func:`pathotune_job` takes a
:class:`PathoTuneJob` (plain data gathered by the caller), yields only :class:`Progress`
records and returns a :class:`JobResult`. The records of
:mod:`napari_gpfm.analyses.pathotune` (``TrainProgress``, ``PredictProgress``) travel unchanged
in ``Progress.data`` so a dock can still show epochs and validation scores.

Stages, in order (``job="pathotune"``):

``"loading backbone"``
    ``started`` then ``done`` (``skipped`` when predicting with a given classifier).
``"reading patches"``
    the labelled patches, read at the encoder's input size: ``started`` (``message`` gives the
    labelled patches per class, ``data`` the ``PatchLabels``), ``running`` per batch
    (``unit="patches"``, ``data`` the ``TrainProgress`` with status ``"reading"``), ``done``.
``"training"``
    ``started``, ``running`` after every optimiser step and every epoch (``unit="steps"``,
    ``data`` the ``TrainProgress`` with status ``"step"`` or ``"epoch"``: epoch, loss, train and
    validation balanced accuracy), then ``done`` (``data`` the last ``TrainProgress``, status
    ``"done"``, ``"stopped-early"`` or ``"cancelled"``).
``"predicting"``
    every patch of the grid: ``started``, ``running`` per batch (``unit="patches"``, ``data``
    the ``PredictProgress``), ``done``.

Inputs are explicit: the grid is the feature store the caller found (``store_path``; the job
never looks for one), else the backbone card's tiling over detected tissue; ``class_names`` in
palette order; annotations in level-0 pixels. Fewer than two classes with labelled patches is a
:class:`NotEnoughClassesError` naming every class and its count.

Cancelling: set ``stop`` (within one training step or prediction batch; the partial result is
returned) or close the generator (at the current record; the inner generators are closed, the
patch-reading processes end, the classifier keeps its best weights so far, nothing is written).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .progress import Meter, Progress

__all__ = [
    "JOB",
    "STAGES",
    "JobResult",
    "NotEnoughClassesError",
    "PathoTuneJob",
    "pathotune_job",
    "resolve_classes",
]

JOB = "pathotune"
LOADING, READING, TRAINING, PREDICTING = (
    "loading backbone", "reading patches", "training", "predicting")
STAGES = (LOADING, READING, TRAINING, PREDICTING)


class NotEnoughClassesError(ValueError):
    """Fewer than two classes have labelled patches; the message names every class's count."""


@dataclass(frozen=True)
class PathoTuneJob:
    """Everything a run needs, gathered by the caller (plain data only).

    Attributes:
        slide_path: the whole-slide image.
        mpp: level-0 µm/px (the slide's, or the user's override); ``None``: read from the file.
        model: backbone model card name (ignored when ``classifier`` is given).
        allow_random: build a seeded random backbone when the weights are missing (tests).
        annotations: ``napari_gpfm.annotations.Annotation`` objects in level-0 pixels (e.g.
            ``annotations_from_layer(shapes, slide.mpp)``); unused when predicting only.
        class_names: the training classes in palette order (``palette.training_names``);
            ``None`` takes the classes the annotations carry, in order of first appearance.
        store_path: the slide's feature store whose grid to use (so the class map lines up with
            the embeddings and the linear probe can be compared on the same split); ``None``:
            the backbone card's tiling over detected tissue.
        prompt_config, template, train_config: ``PromptConfig``, ``TextTemplate``,
            ``TrainConfig`` of :mod:`napari_gpfm.analyses.pathotune`.
        text_encoder: sentence encoder for the text prompts (``None``: MiniLM).
        classifier: a trained ``PathoTuneClassifier``: skip training, predict only.
        colours: (C, 3) RGB 0-255 of ``class_names`` (the palette's); ``None``: the
            annotations' colours, else QuPath's defaults.
        min_fraction: share of a patch a class's shapes must cover to label it.
        num_workers: patch-decoding processes (``None``: the tiles loader's default).
    """

    slide_path: str
    mpp: float | None
    model: str
    allow_random: bool
    annotations: list
    class_names: list[str] | None
    store_path: str | None
    prompt_config: Any
    template: Any
    train_config: Any
    text_encoder: Any = None
    classifier: Any = None  # given: skip training, predict only
    colours: Any = None
    min_fraction: float = 0.5
    num_workers: int | None = None


@dataclass
class JobResult:
    """What a run returns.

    ``train`` is the ``TrainResult`` (``None``: predict only, or cancelled while reading);
    ``prediction`` the ``PredictResult`` of every grid patch (``None``: cancelled or not
    reached; its ``rasters(mpp)`` are the class map, per-class probabilities and uncertainty);
    ``classifier`` the trained (or given) classifier; ``probe_val_bal_acc`` the linear probe's
    validation balanced accuracy on the store's embeddings with PathoTune's exact split
    (``None`` without a store); ``labels`` the ``PatchLabels`` of the grid.
    """

    train: Any
    prediction: Any
    classifier: Any
    n_labelled: int = 0
    probe_val_bal_acc: float | None = None
    labels: Any = None

    @property
    def cancelled(self) -> bool:
        """True when training or prediction stopped before the end."""
        if self.train is not None and self.train.cancelled:
            return True
        return self.prediction is None


def resolve_classes(
    annotations: Iterable[Any], class_names: Sequence[str] | None, colours: Any = None
) -> tuple[list[str], np.ndarray]:
    """(class names, (C, 3) int colours): ``class_names`` as given (else the annotations'
    classes without ``Ignore*``, in order of first appearance) and ``colours`` as given (else
    the annotations' colours, else QuPath's defaults for the names)."""
    from ..annotations.classes import ClassPalette

    palette = ClassPalette.from_annotations(list(annotations))
    names = palette.training_names if class_names is None else [str(n) for n in class_names]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"class names must be unique and non-empty, got {names}")
    for n in names:
        palette.ensure(n)
    if colours is None:
        return names, palette.colours(names)
    col = np.asarray(colours, dtype=np.int64).reshape(-1, 3)
    if len(col) != len(names):
        raise ValueError(f"{len(col)} colours for {len(names)} classes {names}")
    return names, col


def _open_store(job: PathoTuneJob) -> Any:
    from ..embeddings import open_store

    return open_store(job.store_path)


def _grid(job: PathoTuneJob, encoder: Any, store: Any = None) -> tuple[np.ndarray, int]:
    """(coords, patch side level 0): the store's grid, else the card's tiling over tissue."""
    if job.store_path:
        store = store if store is not None else _open_store(job)
        if store.coords is None or store.patch_size_level0 is None:
            raise ValueError(f"{job.store_path}: the feature file records no patch coordinates "
                             "or patch size, so PathoTune cannot use its grid")
        return np.asarray(store.coords, dtype=np.int64), int(store.patch_size_level0)
    from ..embeddings import default_spec
    from ..slide import open_slide
    from ..tiles import detect_tissue, make_grid

    slide = open_slide(job.slide_path, mpp=job.mpp)
    grid = make_grid(slide, default_spec(encoder), detect_tissue(slide),
                     encoder_input=int(encoder.card.input.size))
    return grid.coords, int(grid.patch_size_level0)


def _check_two_classes(labels: Any) -> None:
    counts = labels.counts
    if sum(1 for c in counts.values() if c > 0) >= 2:
        return
    per_class = ", ".join(f"{n} {c}" for n, c in counts.items()) or "none (no classes given)"
    notes = "".join(f"; {s}" for s in labels.skipped)
    raise NotEnoughClassesError(
        "PathoTune needs labelled patches of at least two classes; labelled patches per class: "
        f"{per_class}{notes}. Annotate tissue of at least two classes (a patch is labelled when "
        "a class's shapes cover most of it)"
    )


def _relay(inner: Generator[Any, None, Any],
           translate: Callable[[Any], Iterable[Progress]]) -> Generator[Progress, None, Any]:
    """``yield from inner`` with each record replaced by ``translate(record)``'s records;
    closing this generator closes ``inner`` (so its ``finally``/``with`` blocks run)."""
    try:
        while True:
            try:
                record = next(inner)
            except StopIteration as stop:
                return stop.value
            yield from translate(record)
    finally:
        inner.close()


def _train_records() -> Callable[[Any], Iterable[Progress]]:
    """Translator of ``TrainProgress`` (reading, then training) into Progress."""
    state: dict[str, Any] = {"meter": None}

    def translate(r: Any) -> Iterable[Progress]:
        if r.status == "reading":
            yield Progress(JOB, READING, r.step, r.total_steps, r.rate,
                           (r.total_steps - r.step) / r.rate if r.rate else None,
                           "running", r.message, "patches", r)
            if r.step >= r.total_steps:  # the last batch: training starts when resumed
                yield Progress(JOB, READING, r.step, r.total_steps, r.rate, 0.0, "done",
                               f"read {r.total_steps:,} labelled patches", "patches", r)
                yield Progress(JOB, TRAINING, 0, 0, status="started", unit="steps",
                               message="building the prompts and training")
                state["meter"] = Meter(JOB, TRAINING, 0, "steps")  # the clock starts now
            return
        meter = state["meter"]
        if meter is None:  # no reading before: rates from the second record on
            meter = state["meter"] = Meter(JOB, TRAINING, r.total_steps, "steps", r.step)
        meter.total = int(r.total_steps)
        if r.status == "step":
            msg = (f"epoch {r.epoch}/{r.epochs}, step {r.step}/{r.total_steps}, "
                   f"loss {r.loss:.3f}, {r.rate or 0:.1f} patches/s")
            yield meter.progress(r.step, "running", msg, r)
        elif r.status == "epoch":
            val = "-" if r.val_bal_acc is None else f"{r.val_bal_acc:.3f}"
            best = "-" if r.best_val_bal_acc is None else f"{r.best_val_bal_acc:.3f}"
            msg = (f"epoch {r.epoch}: train acc {r.train_acc:.3f}, validation balanced "
                   f"accuracy {val} (best {best}, epoch {r.best_epoch})")
            yield meter.progress(r.step, "running", msg, r)
        else:  # "done", "stopped-early", "cancelled"
            yield meter.progress(r.step, "done", r.message or r.status, r).with_(eta_s=0.0)

    return translate


def _predict_records(r: Any) -> Iterable[Progress]:
    if r.status == "running":
        yield Progress(JOB, PREDICTING, r.done, r.total, r.rate, r.eta_s, "running",
                       f"predicting {r.done:,}/{r.total:,} patches ({r.rate or 0:.1f}/s)",
                       "patches", r)
    else:  # "done" / "cancelled"
        word = "predicted" if r.status == "done" else "cancelled after"
        yield Progress(JOB, PREDICTING, r.done, r.total, r.rate, 0.0, "done",
                       f"{word} {r.done:,} of {r.total:,} patches", "patches", r)


def pathotune_job(
    job: PathoTuneJob, stop: threading.Event | None = None
) -> Generator[Progress, None, JobResult]:
    """Run ``job``: backbone → patch labels → read → train → predict (see the module
    docstring for the records). ``stop`` (or closing the generator) cancels within one step or
    batch. Raises :class:`NotEnoughClassesError` when fewer than two classes have labelled
    patches (before anything is read or trained)."""
    from ..analyses import pathotune as pt
    from ..annotations.labels import labels_from_annotations

    clf = job.classifier
    if clf is None:
        from ..encoders import load_encoder

        yield Progress(JOB, LOADING, status="started", message=f"loading {job.model}")
        encoder = load_encoder(job.model, allow_random=job.allow_random)
        yield Progress(JOB, LOADING, status="done",
                       message=f"{encoder.card.name}: {encoder.embed_dim}-d backbone")
    else:
        encoder = clf.encoder
        yield Progress(JOB, LOADING, status="skipped",
                       message=f"predicting with the classifier's {encoder.card.name} backbone")
    store = _open_store(job) if job.store_path else None
    coords, size0 = _grid(job, encoder, store)
    train, labels, n_labelled, probe_acc = None, None, 0, None
    if clf is None:
        names, colours = resolve_classes(job.annotations, job.class_names, job.colours)
        labels = labels_from_annotations(job.annotations, coords, size0, names,
                                         job.min_fraction)
        _check_two_classes(labels)
        n_labelled = int((labels.labels >= 0).sum())
        counts = ", ".join(f"{n} {c}" for n, c in labels.counts.items())
        yield Progress(JOB, READING, 0, n_labelled, status="started", unit="patches",
                       message=f"{n_labelled:,} labelled patches ({counts})", data=labels)
        train = yield from _relay(pt.train_from_slide(
            encoder, job.slide_path, coords, size0, labels.labels, labels.class_names,
            job.prompt_config, job.template, job.train_config, job.text_encoder, colours,
            mpp=job.mpp, num_workers=job.num_workers, stop_event=stop),
            _train_records())
        if train is None or train.cancelled:
            return JobResult(train, None, None if train is None else train.classifier,
                             n_labelled, None, labels)
        clf = train.classifier
        probe_acc = _probe_on_same_split(job, labels, train, store)
    elif store is not None:
        from ..analyses.pathotune.predict import check_geometry

        check_geometry(clf, store)  # a loaded classifier: refuse patches of another size
    yield Progress(JOB, PREDICTING, 0, int(coords.shape[0]), status="started", unit="patches",
                   message=f"predicting {coords.shape[0]:,} patches")
    pred = yield from _relay(pt.predict_slide(clf, job.slide_path, coords, size0, mpp=job.mpp,
                                              num_workers=job.num_workers, stop_event=stop),
                             _predict_records)
    return JobResult(train, pred if pred.done else None, clf, n_labelled, probe_acc, labels)


def _probe_on_same_split(job: PathoTuneJob, labels: Any, train: Any,
                         store: Any = None) -> float | None:
    """The linear probe's validation balanced accuracy on the slide's stored embeddings, fitted
    and scored on exactly PathoTune's train/validation patches (None without a store)."""
    if not job.store_path or train.val_indices is None or train.val_indices.size == 0:
        return None
    from ..analyses.probe import holdout_balanced_accuracy

    store = store if store is not None else _open_store(job)
    keep = np.flatnonzero(labels.labels >= 0)
    features = store.features[keep]
    return holdout_balanced_accuracy(features, labels.labels[keep], train.train_indices,
                                     train.val_indices, labels.class_names)
