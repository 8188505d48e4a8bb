"""'PathoTune' dock: prompt-tune a frozen foundation model on the annotations of a slide.

Thin over :mod:`napari_gpfm.analyses.pathotune`: the dock gathers the slide (from the slide
layer's ``metadata["napari_gpfm"]["slide"]``), the annotations (a Shapes layer whose shapes carry
``features["class"]``, read by
:func:`~napari_gpfm.layers.annotation_layers.annotations_from_layer`),
the patch grid (the slide's feature store when there is one, so the class map lines up with the
embeddings; else the model card's tiling over detected tissue), the text template, the prompt
switches (TVP/TTP/IVP), N prompts and epochs. :func:`pathotune_job` then runs in a napari
``thread_worker``: patch labels, reading, training (a progress record per step: Cancel stops
within one step), and prediction of every patch of the grid. The main thread paints the class map,
one probability heatmap per class and the uncertainty like the linear probe does.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..layers.annotation_layers import (
    annotations_from_layer,
    is_annotation_layer,
    prediction_layer_data,
    set_or_add_layer,
)
from ..layers.reader import layer_slide
from . import _workers

__all__ = ["JobResult", "PathoTuneJob", "PathoTuneWidget", "pathotune_job"]


@dataclass(frozen=True)
class PathoTuneJob:
    """Everything a run needs, gathered on the main thread (plain data only)."""

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


@dataclass
class JobResult:
    """What a run returns to the main thread."""

    train: Any  # TrainResult, or None (predict only / cancelled while reading)
    prediction: Any  # PredictResult, or None (cancelled)
    classifier: Any
    n_labelled: int = 0
    probe_val_bal_acc: float | None = None  # linear probe on the store, same validation split


def _grid(job: PathoTuneJob, encoder: Any) -> tuple[np.ndarray, int]:
    """(coords, patch side level 0): the store's grid, else the card's tiling over tissue."""
    if job.store_path:
        from ..embeddings import open_store

        store = open_store(job.store_path)
        return np.asarray(store.coords), int(store.patch_size_level0)
    from ..embeddings import default_spec
    from ..slide import open_slide
    from ..tiles import detect_tissue, make_grid

    slide = open_slide(job.slide_path, mpp=job.mpp)
    grid = make_grid(slide, default_spec(encoder), detect_tissue(slide),
                     encoder_input=int(encoder.card.input.size))
    return grid.coords, int(grid.patch_size_level0)


def pathotune_job(job: PathoTuneJob, stop: threading.Event) -> Generator[Any, None, JobResult]:
    """Worker body: labels → read → train → predict; yields progress records, never touches
    layers. ``stop`` (or closing the generator) cancels within one step or batch."""
    from ..analyses import pathotune as pt
    from ..annotations.labels import labels_from_annotations
    from ..encoders import load_encoder

    clf = job.classifier
    encoder = clf.encoder if clf is not None else load_encoder(
        job.model, allow_random=job.allow_random)
    coords, size0 = _grid(job, encoder)
    train, n_labelled = None, 0
    if clf is None:
        labels = labels_from_annotations(job.annotations, coords, size0, job.class_names)
        n_labelled = int((labels.labels >= 0).sum())
        if len(labels.class_names) < 2:
            raise ValueError("annotate at least two classes (shapes with a 'class') to train")
        from ..annotations.classes import ClassPalette

        colours = ClassPalette([(n, None) for n in labels.class_names]).colours()
        train = yield from pt.train_from_slide(
            encoder, job.slide_path, coords, size0, labels.labels, labels.class_names,
            job.prompt_config, job.template, job.train_config, job.text_encoder, colours,
            mpp=job.mpp, stop_event=stop)
        if train is None or train.cancelled:
            return JobResult(train, None, None if train is None else train.classifier, n_labelled)
        clf = train.classifier
        probe_acc = _probe_on_same_split(job, labels, train)
    pred = yield from pt.predict_slide(clf, job.slide_path, coords, size0, mpp=job.mpp,
                                       stop_event=stop)
    return JobResult(train, pred if pred.done else None, clf, n_labelled,
                     None if job.classifier is not None else probe_acc)


def _probe_on_same_split(job: PathoTuneJob, labels: Any, train: Any) -> float | None:
    """The linear probe's validation balanced accuracy on the slide's stored embeddings, fitted
    and scored on exactly PathoTune's train/validation patches (None without a store)."""
    if not job.store_path or train.val_indices is None:
        return None
    from ..analyses.probe import holdout_balanced_accuracy
    from ..embeddings import open_store

    keep = np.flatnonzero(labels.labels >= 0)
    features = open_store(job.store_path).features[keep]
    return holdout_balanced_accuracy(features, labels.labels[keep], train.train_indices,
                                     train.val_indices, labels.class_names)


class PathoTuneWidget(QWidget):
    """Dock widget; see the module docstring. ``text_encoder`` may be replaced (tests)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        _workers.avoid_llvm_clash()
        self.viewer = napari_viewer
        self.worker = None
        self.classifier = None
        self.last: JobResult | None = None
        self.text_encoder = None
        self._stop = threading.Event()
        self._build()
        self._refresh_layers()
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._refresh_layers)

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        from ..analyses.pathotune.text import DEFAULT_TEMPLATE, TextTemplate
        from ..encoders import default_model_name, list_cards

        self.slide_combo, self.shapes_combo = QComboBox(), QComboBox()
        self.model_combo = QComboBox()
        cards = list_cards()
        self.model_combo.addItems([c.name for c in cards])
        try:
            default = default_model_name()
        except Exception:  # no weights on this machine: keep the first card
            default = None
        if default in [c.name for c in cards]:
            self.model_combo.setCurrentText(default)
        self.random_check = QCheckBox("random weights when missing (testing only)")
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("optional: the slide's feature store (.h5) grid")
        store_button = QPushButton("…")
        store_button.clicked.connect(self._browse_store)
        defaults = TextTemplate()
        self.template_edit = QLineEdit(DEFAULT_TEMPLATE)
        self.stain_edit = QLineEdit(defaults.stain)
        self.tissue_edit = QLineEdit(defaults.tissue)
        self.task_edit = QLineEdit(defaults.task)
        self.tvp_check, self.ttp_check, self.ivp_check = (
            QCheckBox(t) for t in ("TVP (task visual prompts)", "TTP (text prompts)",
                                   "IVP (instance prompts)"))
        for box in (self.tvp_check, self.ttp_check, self.ivp_check):
            box.setChecked(True)
        self.n_spin = self._spin(1, 64, 8)
        self.epochs_spin = self._spin(1, 500, 30)
        self.val_spin = QDoubleSpinBox()
        self.val_spin.setRange(0.0, 0.5)
        self.val_spin.setSingleStep(0.05)
        self.val_spin.setValue(0.2)
        self.train_button = QPushButton("Train && predict")
        self.cancel_button = QPushButton("Cancel")
        self.predict_button = QPushButton("Predict slide")
        self.save_button, self.load_button = QPushButton("Save…"), QPushButton("Load…")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.status = QLabel("annotate at least two classes, then train")
        self.scores = QLabel("-")
        for label in (self.status, self.scores):
            label.setWordWrap(True)

        src = QFormLayout()
        src.addRow("Slide", self.slide_combo)
        src.addRow("Annotations", self.shapes_combo)
        row = QHBoxLayout()
        row.addWidget(self.store_edit)
        row.addWidget(store_button)
        src.addRow("Grid", row)
        src.addRow("Backbone", self.model_combo)
        src.addRow(self.random_check)
        text = QGroupBox("Text prompt")
        tf = QFormLayout(text)
        tf.addRow("Template", self.template_edit)
        tf.addRow("Stain", self.stain_edit)
        tf.addRow("Tissue", self.tissue_edit)
        tf.addRow("Task", self.task_edit)
        prompts = QGroupBox("Prompts and training")
        pf = QFormLayout(prompts)
        pf.addRow(self.tvp_check)
        pf.addRow(self.ttp_check)
        pf.addRow(self.ivp_check)
        pf.addRow("N prompts / block", self.n_spin)
        pf.addRow("Epochs", self.epochs_spin)
        pf.addRow("Validation fraction", self.val_spin)
        buttons = QHBoxLayout()
        for b in (self.train_button, self.cancel_button, self.predict_button):
            buttons.addWidget(b)
        files = QHBoxLayout()
        files.addWidget(self.save_button)
        files.addWidget(self.load_button)
        layout = QVBoxLayout(self)
        layout.addLayout(src)
        layout.addWidget(text)
        layout.addWidget(prompts)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.scores)
        layout.addLayout(files)
        layout.addStretch(1)
        self.train_button.clicked.connect(self.train)
        self.cancel_button.clicked.connect(self.cancel)
        self.predict_button.clicked.connect(self.predict)
        self.save_button.clicked.connect(self._save_clicked)
        self.load_button.clicked.connect(self._load_clicked)

    @staticmethod
    def _spin(lo: int, hi: int, value: int) -> QSpinBox:
        s = QSpinBox()
        s.setRange(lo, hi)
        s.setValue(value)
        return s

    def _refresh_layers(self, event: Any = None) -> None:
        for combo, layers in ((self.slide_combo, self.slide_layers()),
                              (self.shapes_combo, [la for la in self.viewer.layers
                                                   if is_annotation_layer(la)])):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([la.name for la in layers])
            if current in [la.name for la in layers]:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def slide_layers(self) -> list:
        return [la for la in self.viewer.layers if layer_slide(la) is not None]

    def _browse_store(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Feature store", "", "HDF5 (*.h5)")
        if path:
            self.store_edit.setText(path)

    # ------------------------------------------------------------------ inputs
    def _slide_layer(self):
        return next((la for la in self.slide_layers()
                     if la.name == self.slide_combo.currentText()), None)

    def _store_path(self, slide_layer: Any) -> str | None:
        text = self.store_edit.text().strip()
        if text:
            return text
        meta = slide_layer.metadata.get("napari_gpfm", {})
        return str(meta["store"]) if meta.get("store") else None

    def prompt_config(self):
        from ..analyses.pathotune import PromptConfig

        return PromptConfig(tvp=self.tvp_check.isChecked(), n_tvp=self.n_spin.value(),
                            ttp=self.ttp_check.isChecked(), ivp=self.ivp_check.isChecked())

    def template(self):
        from ..analyses.pathotune import TextTemplate

        return TextTemplate(self.template_edit.text(), self.stain_edit.text(),
                            self.tissue_edit.text(), self.task_edit.text())

    def _job(self, classifier: Any = None) -> PathoTuneJob | None:
        from ..analyses.pathotune import TrainConfig

        slide_layer = self._slide_layer()
        if slide_layer is None:
            show_error("PathoTune: open a whole-slide image first")
            return None
        slide = layer_slide(slide_layer)
        annotations: list = []
        if classifier is None:
            shapes = next((la for la in self.viewer.layers
                           if la.name == self.shapes_combo.currentText()
                           and is_annotation_layer(la)), None)
            if shapes is None or not len(shapes.data):
                show_error("PathoTune: draw or import annotations (a Shapes layer whose shapes "
                           "have a 'class') first")
                return None
            annotations = annotations_from_layer(shapes, slide.mpp)
        try:
            template = self.template()
        except ValueError as exc:
            show_error(f"PathoTune: {exc}")
            return None
        return PathoTuneJob(
            slide_path=str(slide.path), mpp=slide.mpp, model=self.model_combo.currentText(),
            allow_random=self.random_check.isChecked(), annotations=annotations,
            class_names=None, store_path=self._store_path(slide_layer),
            prompt_config=self.prompt_config(), template=template,
            train_config=TrainConfig(epochs=self.epochs_spin.value(),
                                     val_fraction=self.val_spin.value()),
            text_encoder=self.text_encoder, classifier=classifier)

    # ------------------------------------------------------------------ runs
    def train(self) -> Any:
        """Start training (then prediction) in a worker; returns the worker."""
        return self._start(self._job())

    def predict(self) -> Any:
        """Predict the slide with the current (trained or loaded) classifier."""
        if self.classifier is None:
            show_error("PathoTune: train or load a classifier first")
            return None
        return self._start(self._job(self.classifier))

    def _start(self, job: PathoTuneJob | None) -> Any:
        if job is None or self.worker is not None:
            return None
        self._stop = threading.Event()
        self.worker = create_worker(
            pathotune_job, job, self._stop, _worker_class=_workers.ClosingGeneratorWorker,
            _start_thread=False,
            _connect={"yielded": self._on_progress, "returned": self._on_done,
                      "errored": self._on_error, "finished": self._on_finished},
        )
        self._busy(True)
        self.status.setText("preparing: patch grid, labels, backbone…")
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Stop the run within one training step / prediction batch."""
        self._stop.set()
        if self.worker is not None:
            self.worker.quit()
        self.status.setText("cancelling…")

    def _busy(self, busy: bool) -> None:
        for b in (self.train_button, self.predict_button, self.save_button, self.load_button):
            b.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def _on_progress(self, r: Any) -> None:
        kind = type(r).__name__
        if kind == "PredictProgress":
            self.progress.setValue(int(100 * r.fraction))
            self.status.setText(f"predicting {r.done:,}/{r.total:,} patches "
                                f"({r.rate or 0:.1f}/s)")
        elif r.status == "reading":
            self.progress.setValue(int(100 * r.fraction))
            self.status.setText(r.message)
        elif r.status == "step":
            self.progress.setValue(int(100 * r.fraction))
            self.status.setText(f"epoch {r.epoch}/{r.epochs}, step {r.step}/{r.total_steps}, "
                                f"loss {r.loss:.3f}, {r.rate or 0:.1f} patches/s")
        elif r.status == "epoch":
            val = "-" if r.val_bal_acc is None else f"{r.val_bal_acc:.3f}"
            best = "-" if r.best_val_bal_acc is None else f"{r.best_val_bal_acc:.3f}"
            self.scores.setText(f"epoch {r.epoch}: train acc {r.train_acc:.3f}, validation "
                                f"balanced accuracy {val} (best {best}, epoch {r.best_epoch})")
        else:
            self.status.setText(r.message or r.status)

    def _on_done(self, result: JobResult) -> None:
        self.last = result
        if result.classifier is not None and (result.train is None or not result.train.cancelled):
            self.classifier = result.classifier
        train = result.train
        if train is not None:
            clf = train.classifier
            val = "n/a" if train.val_bal_acc is None else f"{train.val_bal_acc:.3f}"
            probe = ("n/a (needs the slide's feature store)" if result.probe_val_bal_acc is None
                     else f"{result.probe_val_bal_acc:.3f}")
            self.scores.setText(
                f"{clf.config.label}: {result.n_labelled} labelled patches, validation balanced "
                f"accuracy {val} (epoch {train.best_epoch}); linear probe on the same split: "
                f"{probe}; {clf.model.n_trainable():,} trainable parameters"
                + (" — cancelled" if train.cancelled else ""))
        if result.prediction is not None:
            self._paint(result.prediction)

    def _paint(self, pred: Any) -> None:
        slide_layer = self._slide_layer()
        slide = layer_slide(slide_layer) if slide_layer is not None else None
        clf = self.classifier
        prefix = f"{slide.name if slide else 'slide'} PathoTune"
        for data in prediction_layer_data(pred.rasters(slide.mpp if slide else None),
                                          pred.class_names, clf.colours, prefix):
            set_or_add_layer(self.viewer, data)
        self.status.setText(f"{prefix}: {pred.proba.shape[0]:,} patches predicted "
                            f"({pred.patches_per_s:.1f}/s)")

    def _on_error(self, exc: Exception) -> None:
        self.status.setText(f"error: {exc}")
        show_error(f"PathoTune: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self._busy(False)
        if self._stop.is_set():
            self.status.setText("cancelled")
        self.progress.setValue(100 if not self._stop.is_set() else self.progress.value())

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path | None:
        from ..analyses.pathotune import save_classifier

        if self.classifier is None:
            show_error("PathoTune: nothing to save, train a classifier first")
            return None
        out = save_classifier(self.classifier, path)
        show_info(f"PathoTune classifier saved to {out}")
        return out

    def load(self, path: str | Path) -> Any:
        from ..analyses.pathotune import load_classifier

        try:
            self.classifier = load_classifier(path)
        except Exception as exc:  # the message names the file and the problem
            show_error(f"PathoTune: {exc}")
            return None
        self.scores.setText(f"loaded {Path(path).name}: {self.classifier.config.label} on "
                            f"{self.classifier.encoder.card.name}, classes "
                            f"{', '.join(self.classifier.class_names)}")
        return self.classifier

    def _save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save PathoTune classifier", "",
                                              "PathoTune (*.safetensors)")
        if path:
            self.save(path)

    def _load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load PathoTune classifier", "",
                                              "PathoTune (*.safetensors)")
        if path:
            self.load(path)
