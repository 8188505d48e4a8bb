"""PathoTune on a slide's annotations as a job: backbone → labels → read → train → predict.

The body the 'PathoTune' dock runs in a worker, headless: :func:`pathotune_job` takes a
:class:`PathoTuneJob` (plain data gathered by the caller), yields only :class:`Progress`
records and returns a :class:`JobResult`. The records of
:mod:`napari_gpfm.pathotune` (``TrainProgress``, ``PredictProgress``) travel unchanged
in ``Progress.data`` so a dock can still show epochs and validation scores.

Stages, in order (``job="pathotune"``):

``"loading backbone"``
    ``started``, then ``running`` records counting its steps (``unit="steps"``: importing
    torch, building the network, checking the weights' SHA-256 (the message counts the
    megabytes), reading the weights, and with text prompts and no ``text_encoder`` given,
    loading MiniLM), repeated every quarter second with the time spent while a step runs, then
    ``done`` (``skipped`` when predicting with a given classifier).
``"reading patches"``
    the labelled patches, read at the encoder's input size: ``started`` (``message`` gives the
    labelled patches per class and the split, ``data`` a :class:`SplitSummary`: labelled
    patches per class, as ``counts``, and the train/validation split training will use, known
    before anything is read), ``running`` per batch
    (``unit="patches"``, ``data`` the ``TrainProgress`` with status ``"reading"``), ``done``.
``"training"``
    ``started``, ``running`` after every optimiser step and every epoch (``unit="steps"``,
    ``data`` the ``TrainProgress`` with status ``"step"`` or ``"epoch"``: epoch, loss, train and
    validation balanced accuracy), then ``done`` (``data`` the last ``TrainProgress``, status
    ``"done"``, ``"stopped-early"`` or ``"cancelled"``).
``"predicting"``
    every patch of the grid: ``started``, ``running`` per batch (``unit="patches"``, ``data``
    the ``PredictProgress``), ``done``.

The result also holds what a dock paints and shows, computed in the job (off the main thread):
the PathoTune rasters (``rasters``), the linear probe fitted on PathoTune's training patches of
the store's embeddings and its prediction of every patch (``probe_prediction``,
``probe_rasters``), and the share of patches where the two maps agree (``agreement``).

Heavy imports and model construction run without garbage collections (:func:`quiet_gc`): a
full collection of a napari + torch heap holds the GIL long enough to freeze the window.

Inputs are explicit: the grid is the feature store the caller found (``store_path``; the job
never looks for one), else the backbone card's tiling over detected tissue; ``class_names`` in
palette order; annotations in level-0 pixels. Fewer than two classes with labelled patches is a
:class:`NotEnoughClassesError` naming every class and its count.

Cancelling: set ``stop`` (within one training step or prediction batch; the partial result is
returned) or close the generator (at the current record; the inner generators are closed, the
patch-reading processes end, the classifier keeps its best weights so far, nothing is written).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import NapariGpfmError
from .progress import Meter, Progress

__all__ = [
    "JOB",
    "STAGES",
    "JobResult",
    "NotEnoughClassesError",
    "PathoTuneJob",
    "SplitSummary",
    "pathotune_job",
    "quiet_gc",
    "resolve_classes",
]

JOB = "pathotune"
LOADING, READING, TRAINING, PREDICTING = (
    "loading backbone", "reading patches", "training", "predicting")
STAGES = (LOADING, READING, TRAINING, PREDICTING)


class NotEnoughClassesError(NapariGpfmError, ValueError):
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
            ``TrainConfig`` of :mod:`napari_gpfm.pathotune`.
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
class SplitSummary:
    """Labelled patches per class and how training will split them (validation = stratified
    ``val_fraction`` of every class with at least two patches), known before reading."""

    class_names: list[str]
    labelled: dict[str, int]
    train: dict[str, int]
    validation: dict[str, int]
    labels: Any = field(default=None, repr=False)  # the PatchLabels

    @property
    def counts(self) -> dict[str, int]:
        """Labelled patches per class (as ``PatchLabels.counts``)."""
        return dict(self.labelled)

    @property
    def n_train(self) -> int:
        return sum(self.train.values())

    @property
    def n_validation(self) -> int:
        return sum(self.validation.values())


@dataclass
class JobResult:
    """What a run returns.

    ``train`` is the ``TrainResult`` (``None``: predict only, or cancelled while reading);
    ``prediction`` the ``Prediction`` of every grid patch (``None``: cancelled or not
    reached; its ``rasters()`` are the class map, per-class probabilities and uncertainty);
    ``classifier`` the trained (or given) classifier; ``probe_val_bal_acc`` the linear probe's
    validation balanced accuracy on the store's embeddings with PathoTune's exact split
    (``None`` without a store); ``labels`` the ``PatchLabels`` of the grid; ``split`` the
    :class:`SplitSummary`. ``rasters`` are the prediction's rasters at the job's mpp;
    ``probe_prediction`` the same-split probe's ``Prediction`` of every patch (with
    ``probe_rasters``), ``agreement`` the share of patches both classify alike (``None``
    without a store).
    """

    train: Any
    prediction: Any
    classifier: Any
    n_labelled: int = 0
    probe_val_bal_acc: float | None = None
    labels: Any = None
    split: SplitSummary | None = None
    rasters: dict | None = None
    probe_prediction: Any = None
    probe_rasters: dict | None = None
    agreement: float | None = None

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


_GC_LOCK = threading.Lock()
_GC_HOLDERS: list[int] = []


@contextlib.contextmanager
def quiet_gc() -> Any:
    """No garbage collection while heavy modules are imported or models built in a worker
    thread (a full collection of napari's and torch's heap holds the GIL, freezing the window,
    for hundreds of ms); the objects alive at the end are frozen (``gc.freeze``: later full
    collections skip them). Nestable, across threads."""
    with _GC_LOCK:
        _GC_HOLDERS.append(threading.get_ident())
        gc.disable()
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_HOLDERS.remove(threading.get_ident())
            if not _GC_HOLDERS:
                gc.freeze()
                gc.enable()


def _in_thread(fn: Callable[[], Any], stage: str, done: int, total: int, what: str
               ) -> Generator[Progress, None, Any]:  # fmt: skip
    """Run ``fn`` in a helper thread, yielding a record every quarter second with the time
    spent (so a long, silent call still shows that it is alive); returns its value."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with quiet_gc():
                box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the job
            box["error"] = exc

    t0 = time.perf_counter()
    thread = threading.Thread(target=run, name=f"napari-gpfm {what}", daemon=True)
    thread.start()
    yield Progress(JOB, stage, done, total, status="running", unit="steps", message=f"{what}…")
    while thread.is_alive():
        thread.join(0.25)
        if thread.is_alive():
            yield Progress(JOB, stage, done, total, status="running", unit="steps",
                           message=f"{what}… {time.perf_counter() - t0:.0f} s")  # fmt: skip
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _checksum(path: Any, card_name: str, done: int, total: int
              ) -> Generator[Progress, None, str]:  # fmt: skip
    """SHA-256 of a weights file, yielding megabytes read (a GPFM file is over a gigabyte)."""
    import os

    size = max(os.path.getsize(path), 1)
    total_mb = max(int(size / 2**20), 1)
    digest = hashlib.sha256()
    read, last = 0, 0.0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
            read += len(chunk)
            now = time.perf_counter()
            if now - last > 0.2:
                last = now
                yield Progress(JOB, LOADING, done, total, status="running", unit="steps",
                               message=f"{card_name}: checking the weights "
                                       f"({read / 2**20:,.0f} / {total_mb:,} MB)")
    return digest.hexdigest()


def load_backbone(model: str, allow_random: bool = False, seed: int = 0, more_steps: int = 0
                  ) -> Generator[Progress, None, Any]:  # fmt: skip
    """``encoders.load_encoder`` step by step, with a record per step (and every quarter
    second during one) instead of one silent wait; returns the ``Encoder``. Records count
    ``more_steps`` beyond the backbone's in their total (work the caller does next)."""
    n = 4 + more_steps
    card = yield from _in_thread(lambda: _card(model), LOADING, 0, n,
                                 f"{model}: importing torch and timm")
    from ..encoders.encoder import RANDOM_INIT_PREFIX, Encoder, build_model
    from ..encoders.errors import CheckpointError, WeightsNotFoundError

    path = card.resolve_weights(None)
    if path is not None and not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: the weights file given for model '{card.name}' does not exist.")
    if path is None and not allow_random:
        raise WeightsNotFoundError(card.missing_weights_message())
    arch = card.architecture.timm_name
    if path is None:
        import torch

        def random_model() -> Any:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return build_model(card)

        net = yield from _in_thread(random_model, LOADING, 1, n,
                                    f"{card.name}: building {arch} (random weights)")
        return Encoder(net, card, None, f"{RANDOM_INIT_PREFIX}{seed}")
    net = yield from _in_thread(lambda: build_model(card), LOADING, 1, n,
                                f"{card.name}: building {arch}")
    digest = yield from _checksum(path, card.name, 2, n)
    if card.weights.sha256 and digest != card.weights.sha256:
        raise CheckpointError(
            path, f"SHA-256 {digest} does not match {card.weights.sha256} recorded for "
                  f"'{card.name}': the file is damaged or a different release; download it "
                  "again.")  # fmt: skip
    from ..encoders.checkpoint import load_weights

    yield from _in_thread(lambda: load_weights(net, path, model_name=card.name,
                                               expected_layout=card.checkpoint_layout),
                          LOADING, 3, n, f"{card.name}: reading the weights ({path.name})")
    return Encoder(net, card, path, digest)


def _card(model: str) -> Any:
    import timm  # noqa: F401 - imported here, in the helper thread, without collections
    import torch  # noqa: F401

    from ..encoders import get_card

    return get_card(model)


def _needs_text_encoder(job: PathoTuneJob) -> bool:
    return job.text_encoder is None and bool(getattr(job.prompt_config, "ttp", False))


def _text_encoder(job: PathoTuneJob, names: list[str], done: int
                  ) -> Generator[Progress, None, Any]:  # fmt: skip
    """The text encoder TTP needs, loaded (and the template's sentences encoded) here, in the
    loading stage, rather than silently inside training."""
    if not _needs_text_encoder(job):
        return job.text_encoder
    from ..pathotune.text import encode_sentences, get_text_encoder

    def load() -> Any:
        enc = get_text_encoder()
        encode_sentences(job.template, names, enc)  # loads MiniLM; the sentences are cached
        return enc

    return (yield from _in_thread(load, LOADING, done, done + 1,
                                  "loading the text encoder (MiniLM) for the text prompts"))


def _open_store(job: PathoTuneJob) -> Any:
    from ..embeddings import open_store

    return open_store(job.store_path)


def _grid(job: PathoTuneJob, encoder: Any, store: Any = None) -> Any:
    """The ``PatchSet`` to train on and predict: the store's grid, else the card's tiling over
    tissue (with that tiling as its recipe)."""
    from ..analyses.classifier import PatchSet

    if job.store_path:
        store = store if store is not None else _open_store(job)
        if store.coords is None or store.patch_size_level0 is None:
            raise ValueError(f"{job.store_path}: the feature file records no patch coordinates "
                             "or patch size, so PathoTune cannot use its grid")
        return PatchSet.from_store(store, job.slide_path, job.mpp)
    from ..embeddings import default_spec
    from ..slide import open_slide
    from ..tiles import detect_tissue, make_grid

    slide = open_slide(job.slide_path, mpp=job.mpp)
    spec = default_spec(encoder)
    grid = make_grid(slide, spec, detect_tissue(slide),
                     encoder_input=int(encoder.card.input.size))
    recipe = {"model": encoder.card.name, "target_mpp": spec.target_mpp,
              "patch_size": spec.patch_size, "overlap": spec.overlap,
              "min_tissue": spec.min_tissue}  # fmt: skip
    return PatchSet(str(job.slide_path), grid.coords, int(grid.patch_size_level0), slide.mpp,
                    recipe)


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
    from .. import pathotune as pt
    from ..annotations.labels import labels_from_annotations

    clf = job.classifier
    text_encoder = job.text_encoder
    if clf is None:
        yield Progress(JOB, LOADING, status="started", message=f"loading {job.model}")
        more = int(_needs_text_encoder(job))
        encoder = yield from load_backbone(job.model, job.allow_random, more_steps=more)
        names, _ = resolve_classes(job.annotations, job.class_names, job.colours)
        text_encoder = yield from _text_encoder(job, names, 4)
        yield Progress(JOB, LOADING, 4 + more, 4 + more, status="done", unit="steps",
                       message=f"{encoder.card.name}: {encoder.embed_dim}-d backbone")
    else:
        encoder = clf.encoder
        yield Progress(JOB, LOADING, status="skipped",
                       message=f"predicting with the classifier's {encoder.card.name} backbone")
    store = _open_store(job) if job.store_path else None
    patches = _grid(job, encoder, store)
    train, labels, n_labelled, probe_acc, split, probe_pred = None, None, 0, None, None, None
    if clf is None:
        names, colours = resolve_classes(job.annotations, job.class_names, job.colours)
        labels = labels_from_annotations(job.annotations, patches.coords,
                                         patches.patch_size_level0, names, job.min_fraction)
        _check_two_classes(labels)
        n_labelled = int((labels.labels >= 0).sum())
        split = split_summary(labels, job.train_config)
        counts = ", ".join(f"{n} {c}" for n, c in labels.counts.items())
        yield Progress(JOB, READING, 0, n_labelled, status="started", unit="patches", data=split,
                       message=f"{n_labelled:,} labelled patches ({counts}): "
                               f"{split.n_train:,} to train, {split.n_validation:,} to "
                               "validate")  # fmt: skip
        options = pt.TuneOptions(job.prompt_config, job.template, job.train_config,
                                 text_encoder, colours, job.num_workers)
        train = yield from _relay(pt.train_from_slide(
            encoder, patches, labels.labels, labels.class_names, options, stop),
            _train_records())
        if train is None or train.cancelled:
            return JobResult(train, None, None if train is None else train.classifier,
                             n_labelled, None, labels, split)
        clf = train.classifier
        probe_acc, probe_pred = _probe_on_same_split(job, labels, train, store, patches)
    elif store is not None:
        clf.check_store(store)  # a loaded classifier: refuse patches of another size
    n = int(patches.coords.shape[0])
    yield Progress(JOB, PREDICTING, 0, n, status="started", unit="patches",
                   message=f"predicting {n:,} patches")
    pred = yield from _relay(pt.predict_slide(clf, patches, num_workers=job.num_workers,
                                              stop_event=stop), _predict_records)
    result = JobResult(train, pred if pred.complete else None, clf, n_labelled, probe_acc,
                       labels, split)  # fmt: skip
    if result.prediction is not None:  # what the dock paints, built here (not on the main thread)
        result.rasters = pred.rasters()
        if probe_pred is not None:
            result.probe_prediction = probe_pred
            result.probe_rasters = probe_pred.rasters()
            both = (pred.labels >= 0) & (probe_pred.labels >= 0)
            if both.any():
                result.agreement = float((pred.labels[both] == probe_pred.labels[both]).mean())
    return result


def split_summary(labels: Any, train_config: Any) -> SplitSummary:
    """Labelled patches per class and the train/validation split training will make (the same
    function and seed as :mod:`napari_gpfm.pathotune.train`)."""
    from ..pathotune.train import stratified_split

    names = list(labels.class_names)
    y = np.asarray(labels.labels)
    y = y[y >= 0]
    val_fraction = getattr(train_config, "val_fraction", 0.2)
    seed = getattr(train_config, "seed", 0)
    tr, va = stratified_split(y, val_fraction, seed)
    count = lambda idx: {n: int((y[idx] == i).sum()) for i, n in enumerate(names)}  # noqa: E731
    return SplitSummary(names, {n: int(v) for n, v in labels.counts.items()}, count(tr),
                        count(va), labels)  # fmt: skip


def _probe_on_same_split(job: PathoTuneJob, labels: Any, train: Any, store: Any,
                         patches: Any) -> tuple[float | None, Any]:  # fmt: skip
    """A linear probe on the slide's stored embeddings fitted on exactly PathoTune's training
    patches: its validation balanced accuracy on PathoTune's validation patches (``None``
    without validation patches) and its ``Prediction`` of every patch of the grid (the map
    painted beside PathoTune's). ``(None, None)`` without a store."""
    if not job.store_path or train.train_indices is None:
        return None, None
    from ..analyses.classify import predict_features, store_recipe
    from ..analyses.probe import balanced_accuracy, fit_probe

    store = store if store is not None else _open_store(job)
    names = list(labels.class_names)
    X = np.asarray(store.features)
    keep = np.flatnonzero(labels.labels >= 0)
    y = labels.labels[keep]
    tr = np.asarray(train.train_indices)
    if len(np.unique(y[tr])) < 2:
        return None, None
    colours = train.classifier.colours
    probe = fit_probe(X[keep][tr], y[tr], names, colours=colours, recipe=store_recipe(store))
    acc = None
    va = np.asarray(train.val_indices) if train.val_indices is not None else np.zeros(0, int)
    if va.size:
        acc = balanced_accuracy(y[va], probe.predict(X[keep][va]))
    return acc, predict_features(probe, X, patches)
