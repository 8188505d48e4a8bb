"""'PathoTune' dock: prompt-tune a frozen foundation model on the annotations of a slide.

Thin over the window's :class:`~napari_gpfm.layers.session.ViewerSession` and
:func:`napari_gpfm.jobs.pathotune_job` (the job body; see its module for the stages). The dock
gathers, on the main thread:

- the slide (the session's slide layers) and its feature store from
  :meth:`~napari_gpfm.layers.session.ViewerSession.find_store`: PathoTune then trains and
  predicts on the embedded patch grid, so its class map lines up with the embeddings, and the
  linear probe is scored on exactly PathoTune's train/validation split beside it. Without
  embeddings the job tiles the slide itself with the backbone card's tiling (no comparison);
- the annotations of a Shapes layer (read relative to the slide layer, wherever it sits) and
  the class names in the order of the session's class palette (shared with the Annotate dock);
- the backbone (the store's model by default), text template, prompt switches, epochs.

The job runs in a :class:`~._jobs.JobPanel` (progress, Cancel, errors; model loading shows
its steps). Before anything is read the dock lists the labelled patches per class and how they
are split for training and validation, with a visible warning while a class has fewer than 20
labelled patches or the validation fewer than 30 (shared with the Annotate dock). The
prediction is painted like the session's (class map, one probability map per class,
uncertainty: ``"<slide> · PathoTune classes"`` …), aligned with the slide layer, one layer per
turn of the event loop, and the classifier becomes the session's ``"pathotune"`` classifier.
With the slide's embeddings, the linear probe fitted on PathoTune's training patches paints
its map beside it (``"<slide> · probe classes"``), and a small table gives both validation
scores on the same split and how often the two maps agree. The backbone list follows the
model registry (a finetuned model appears at once: the session's ``models`` event).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtCore import QObject, QTimer, Signal
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
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..embeddings import StoreError
from ..encoders.errors import EncoderError
from ..layers.annotation_layers import annotations_from_layer, is_annotation_layer
from ..layers.session import session_for
from ._jobs import JobPanel, scrolling_layout, settle_width, start_warming, tap
from .annotate_widget import (
    WARNING_STYLE,
    fill_table,
    paint_predictions,
    relative_to_slide,
    sample_warnings,
    show_warnings,
    small_table,
)
from .gpfm_widget import fill_slide_combo

__all__ = ["PathoTuneWidget"]


class _Relay(QObject):
    """Carries a job's records from its worker thread to the dock (lives as long as the job)."""

    record = Signal(object)


SOURCE = "pathotune"  # the session's classifier / prediction key
LABEL = "PathoTune"  # result layers: "<slide> · PathoTune classes"
#: The same-split linear probe's prediction key; its layers are "<slide> · probe classes" …
PROBE_SOURCE, PROBE_LABEL = "probe (PathoTune split)", "probe"
#: What the dock catches from the package and shows (never a bare ``Exception``).
USER_ERRORS = (ValueError, LookupError, OSError, StoreError, EncoderError)


class PathoTuneWidget(QWidget):
    """Dock widget; see the module docstring. ``text_encoder`` may be replaced (tests)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.classifier = None
        self.last: Any = None  # the last run's JobResult
        self.text_encoder = None
        self.loading_steps: list[str] = []  # the last run's model-loading messages
        self._stop = threading.Event()
        self._running: dict[str, Any] = {}  # the running job's worker and stop event
        self._build()
        settle_width(self)
        self._connect()
        self._refresh_layers()
        start_warming()

    @property
    def layers(self) -> Any:
        return self.session.viewer.layers

    @property
    def worker(self) -> Any:
        """The running job's worker, ``None`` when idle."""
        return self.jobs.worker

    # ================================================================== UI
    def _build(self) -> None:
        from ..pathotune.text import DEFAULT_TEMPLATE, TextTemplate
        from ..encoders import default_model_name, list_cards

        self.slide_combo, self.shapes_combo = QComboBox(), QComboBox()
        self.grid_label = QLabel("-")
        self.grid_label.setWordWrap(True)
        self.model_combo = QComboBox()
        cards = list_cards()
        self.model_combo.addItems([c.name for c in cards])
        try:
            default = default_model_name()
        except EncoderError:  # no weights on this machine: keep the first card
            default = None
        if default in [c.name for c in cards]:
            self.model_combo.setCurrentText(default)
        self.counts_table = small_table()  # labelled / train / validation patches per class
        self.warning_label = QLabel("")
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet(WARNING_STYLE)
        self.warning_label.setVisible(False)
        self.compare_table = small_table()  # PathoTune vs probe on the same split
        self.compare_table.setVisible(False)
        self.random_check = QCheckBox("random weights when missing (testing only)")
        defaults = TextTemplate()
        self.template_edit = QLineEdit(DEFAULT_TEMPLATE)
        self.stain_edit = QLineEdit(defaults.stain)
        self.tissue_edit = QLineEdit(defaults.tissue)
        self.task_edit = QLineEdit(defaults.task)
        self.tvp_check, self.ttp_check, self.ivp_check = (
            QCheckBox(t) for t in ("TVP (task visual prompts)", "TTP (text prompts)",
                                   "IVP (instance prompts)"))  # fmt: skip
        for box in (self.tvp_check, self.ttp_check, self.ivp_check):
            box.setChecked(True)
        self.n_spin = self._spin(1, 64, 8)
        self.epochs_spin = self._spin(1, 500, 30)
        self.val_spin = QDoubleSpinBox()
        self.val_spin.setRange(0.0, 0.5)
        self.val_spin.setSingleStep(0.05)
        self.val_spin.setValue(0.2)
        self.train_button = QPushButton("Train && predict")
        self.predict_button = QPushButton("Predict slide")
        self.save_button, self.load_button = QPushButton("Save…"), QPushButton("Load…")
        buttons = [self.train_button, self.predict_button, self.save_button, self.load_button]
        self.jobs = JobPanel("PathoTune", self.session, buttons)
        self.cancel_button = self.jobs.cancel_button
        self.progress = self.jobs.bar
        self.status = self.jobs.status
        self.jobs.say("Annotate at least two classes (Annotate and classify dock), then train.")
        self.scores = QLabel("-")
        self.scores.setWordWrap(True)

        src = QFormLayout()
        src.addRow("Slide", self.slide_combo)
        src.addRow("Annotations", self.shapes_combo)
        src.addRow("Grid", self.grid_label)
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
        row = QHBoxLayout()
        row.addWidget(self.train_button)
        row.addWidget(self.predict_button)
        files = QHBoxLayout()
        files.addWidget(self.save_button)
        files.addWidget(self.load_button)
        layout = scrolling_layout(self)
        layout.addLayout(src)
        layout.addWidget(text)
        layout.addWidget(prompts)
        layout.addLayout(row)
        layout.addWidget(self.jobs)
        layout.addWidget(self.counts_table)
        layout.addWidget(self.warning_label)
        layout.addWidget(self.compare_table)
        layout.addWidget(self.scores)
        layout.addLayout(files)
        layout.addStretch(1)
        for combo in (self.slide_combo, self.shapes_combo, self.model_combo):
            combo.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)

    @staticmethod
    def _spin(lo: int, hi: int, value: int) -> QSpinBox:
        s = QSpinBox()
        s.setRange(lo, hi)
        s.setValue(value)
        return s

    def _connect(self) -> None:
        # Qt's clicked(bool) would arrive as the first argument: every slot is a lambda
        self.train_button.clicked.connect(lambda: self.train())
        self.predict_button.clicked.connect(lambda: self.predict())
        self.save_button.clicked.connect(lambda: self._save_clicked())
        self.load_button.clicked.connect(lambda: self._load_clicked())
        # Cancel also stops the job within one training step / prediction batch
        self.cancel_button.clicked.connect(lambda: self._stop.set())
        self.slide_combo.currentIndexChanged.connect(lambda _: self._on_slide_changed())
        layers, ev = self.layers, self.session.events
        hooks = [(layers.events.inserted, self._refresh_layers),
                 (layers.events.removed, self._refresh_layers),
                 (ev.slides, self._refresh_layers), (ev.store, self._on_store),
                 (ev.models, self._models_changed)]  # fmt: skip
        for emitter, cb in hooks:
            emitter.connect(cb)
        disconnects = [lambda e=e, c=c: e.disconnect(c) for e, c in hooks]
        running = self._running
        self.jobs.finished.connect(lambda _: running.clear())

        def teardown(*_: Any) -> None:
            """The dock is deleted: its job stops, the session forgets it (a closure: the
            widget is gone by then)."""
            if running:
                running["stop"].set()
                running["worker"].quit()
                running.clear()
            for fn in disconnects:
                fn()

        self.destroyed.connect(teardown)

    # ================================================================== inputs
    def _models_changed(self, event: Any = None) -> None:
        """The session's ``models`` event: refresh on the next turn of the event loop (every
        dock's list refreshes on this event; not all in one go)."""
        QTimer.singleShot(0, self.refresh_models)

    def refresh_models(self, event: Any = None) -> None:
        """The backbone list follows the registry (a model finetuned meanwhile appears)."""
        from ..encoders import list_cards

        current = self.model_combo.currentText()
        names = [c.name for c in list_cards()]
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems(names)
        if current in names:
            self.model_combo.setCurrentText(current)
        self.model_combo.blockSignals(False)

    def current_uid(self) -> int | None:
        return self.slide_combo.currentData()

    def slide_state(self) -> Any:
        return self.session.slides.get(self.current_uid())

    def select_slide(self, key: Any) -> None:
        s = self.session.slide(key)
        self.slide_combo.setCurrentIndex(self.slide_combo.findData(s.uid))

    def _refresh_layers(self, event: Any = None) -> None:
        before = self.current_uid()
        fill_slide_combo(self.slide_combo, self.session)
        current = self.shapes_combo.currentData()
        shapes = [la for la in self.layers if is_annotation_layer(la)]
        self.shapes_combo.blockSignals(True)
        self.shapes_combo.clear()
        for la in shapes:
            self.shapes_combo.addItem(la.name, int(la.unique_id))
        i = self.shapes_combo.findData(current)
        self.shapes_combo.setCurrentIndex(i if i >= 0 else len(shapes) - 1)
        self.shapes_combo.blockSignals(False)
        if self.current_uid() != before or event is None:
            self._on_slide_changed()

    def _on_store(self, event: Any) -> None:
        if event.value == self.current_uid():
            self._on_slide_changed()

    def _on_slide_changed(self) -> None:
        """Show the grid PathoTune will use; the backbone follows the slide's embeddings."""
        s = self.slide_state()
        store = self._store(s)
        if s is None:
            self.grid_label.setText("Open a whole-slide image (File > Open).")
        elif store is None:
            self.grid_label.setText(
                f"{s.name}: no embeddings, so PathoTune tiles the slide with the backbone's "
                "tiling and the linear probe cannot be compared. Compute embeddings in the "
                "GPFM dock to train on their patches.")  # fmt: skip
        else:
            self.grid_label.setText(f"{s.name}: the embedded patches, {store.describe()}")
            i = self.model_combo.findText(store.model or "")
            if i >= 0:
                self.model_combo.setCurrentIndex(i)

    def _store(self, s: Any) -> Any:
        if s is None:
            return None
        try:
            return self.session.find_store(s.uid)
        except USER_ERRORS as exc:
            self.jobs.say(f"{s.name}: {exc}", error=True)
            return None

    def shapes_layer(self) -> Any:
        uid = self.shapes_combo.currentData()
        return next((la for la in self.layers if int(la.unique_id) == uid), None)

    def prompt_config(self) -> Any:
        from ..pathotune import PromptConfig

        return PromptConfig(tvp=self.tvp_check.isChecked(), n_tvp=self.n_spin.value(),
                            ttp=self.ttp_check.isChecked(), ivp=self.ivp_check.isChecked())

    def template(self) -> Any:
        from ..pathotune import TextTemplate

        return TextTemplate(self.template_edit.text(), self.stain_edit.text(),
                            self.tissue_edit.text(), self.task_edit.text())

    def _classes(self, annotations: list) -> tuple[list[str], Any]:
        """The annotated training classes in palette order, and their palette colours; classes
        the palette lacks join it."""
        palette = self.session.palette
        used = []
        for a in annotations:
            if a.class_name and a.class_name not in used:
                used.append(a.class_name)
                palette.ensure(a.class_name, a.color)
        names = [n for n in palette.training_names if n in used]
        return names, palette.colours(names)

    def _job(self, classifier: Any = None) -> Any:
        """The job's inputs read from the dock, as a function building the ``PathoTuneJob``
        (called in the worker: the PathoTune modules import there, 0.1 s that froze the
        window at the click); raises the package's errors with a message for the user."""
        s = self.slide_state()
        if s is None:
            raise LookupError("Open a whole-slide image first (File > Open, or the sample).")
        annotations: list = []
        names, colours = None, None
        if classifier is None:
            shapes = self.shapes_layer()
            if shapes is None or not len(shapes.data):
                raise ValueError("Draw or import annotations first (a Shapes layer whose shapes "
                                 "have a class: Annotate and classify dock).")  # fmt: skip
            annotations = annotations_from_layer(relative_to_slide(shapes, s.offset), s.mpp,
                                                 self.session.palette)  # fmt: skip
            names, colours = self._classes(annotations)
        store = self._store(s)
        fields = {
            "slide_path": str(s.slide.path), "mpp": s.mpp,
            "model": self.model_combo.currentText(),
            "allow_random": self.random_check.isChecked(), "annotations": annotations,
            "class_names": names, "colours": colours,
            "store_path": None if store is None else str(store.path),
            "text_encoder": self.text_encoder, "classifier": classifier,
        }  # fmt: skip
        prompt = {"tvp": self.tvp_check.isChecked(), "n_tvp": self.n_spin.value(),
                  "ttp": self.ttp_check.isChecked(), "ivp": self.ivp_check.isChecked()}
        words = (self.template_edit.text(), self.stain_edit.text(), self.tissue_edit.text(),
                 self.task_edit.text())
        epochs, val = self.epochs_spin.value(), self.val_spin.value()

        def build() -> Any:
            from ..jobs.pathotune import PathoTuneJob
            from ..pathotune import PromptConfig, TextTemplate, TrainConfig

            return PathoTuneJob(**fields, prompt_config=PromptConfig(**prompt),
                                template=TextTemplate(*words),
                                train_config=TrainConfig(epochs=epochs, val_fraction=val))

        return build

    # ================================================================== runs
    def train(self) -> Any:
        """Start training (then prediction of the slide); returns the worker."""
        return self._start(None)

    def predict(self) -> Any:
        """Predict the slide with the current (trained or loaded) classifier."""
        if self.classifier is None:
            self.jobs.say("Train or load a PathoTune classifier first.", error=True)
            return None
        return self._start(self.classifier)

    def _start(self, classifier: Any) -> Any:
        if self.jobs.busy:
            return None
        try:
            build = self._job(classifier)
        except USER_ERRORS as exc:
            self.jobs.say(str(exc), error=True)
            return None
        self._stop = threading.Event()
        stop = self._stop

        def run() -> Any:  # in the worker, imports included
            from ..jobs.pathotune import pathotune_job

            return (yield from pathotune_job(build(), stop))

        uid = self.current_uid()
        s = self.session.slides[uid]
        what = "Predicting" if classifier is not None else "Training PathoTune on"
        if classifier is None:
            self.compare_table.setVisible(False)
        self.loading_steps = []
        relay = _Relay()  # records reach the dock from the first one on (no race with start)
        relay.record.connect(self._on_progress)
        job = tap(run(), relay.record.emit)
        worker = self.jobs.run(job, slide=uid, on_result=lambda r: self._on_done(uid, r),
                               message=f"{what} {s.name}…")  # fmt: skip
        self._running.update(worker=worker, stop=self._stop, relay=relay)
        return worker

    def _on_progress(self, p: Any) -> None:
        """Model loading's steps are kept (``loading_steps``); the labelled patches per class
        and the split are shown as soon as the job knows them."""
        if p.stage == "loading backbone" and p.message and (
                not self.loading_steps or self.loading_steps[-1] != p.message):  # fmt: skip
            self.loading_steps.append(p.message)
        split = p.data
        if p.stage == "reading patches" and p.status == "started" and hasattr(split, "train"):
            self.show_split(split)

    def show_split(self, split: Any, n_validation: int | None = None) -> None:
        """The per-class table (labelled, training, validation patches) and the warnings."""
        names = list(split.class_names)
        palette = self.session.palette
        fill_table(self.counts_table, ["class", "labelled", "train", "validation"],
                   [(n, split.labelled.get(n, 0), split.train.get(n, 0),
                     split.validation.get(n, 0)) for n in names],
                   colours=[palette.colour(n) if n in palette else None
                            for n in names])  # fmt: skip
        n_val = split.n_validation if n_validation is None else n_validation
        show_warnings(self.warning_label, sample_warnings(split.labelled, n_val))

    def cancel(self) -> None:
        """Stop the run within one training step / prediction batch."""
        self._stop.set()
        self.jobs.cancel()

    def _on_done(self, uid: int, result: Any) -> None:
        self.last = result
        train = result.train
        if result.split is not None:
            n_val = None if train is None or train.val_indices is None \
                else int(np.asarray(train.val_indices).size)  # fmt: skip
            self.show_split(result.split, n_val)
        if train is not None:
            clf = train.classifier
            self.show_comparison(result)
            self.scores.setText(
                f"{clf.config.label}: {result.n_labelled} labelled patches, best epoch "
                f"{train.best_epoch}; {clf.model.n_trainable():,} trainable parameters"
                + ("" if result.probe_prediction is not None or result.prediction is None
                   else "; no embeddings of this slide, so no linear probe to compare "
                        "(compute them in the GPFM dock)")
                + (" — cancelled" if train.cancelled else ""))  # fmt: skip
        if result.cancelled:
            self.jobs.say("Cancelled: nothing painted.")
            return
        self.classifier = result.classifier
        self.session.set_classifier(SOURCE, result.classifier)
        if uid not in self.session.slides:
            return  # the slide was closed meanwhile
        s = self.session.slides[uid]
        pred = result.prediction
        rasters = result.rasters if result.rasters is not None else pred.rasters()
        colours = result.classifier.colours
        paints = [(uid, SOURCE, rasters, pred.class_names, colours, LABEL)]
        if result.probe_rasters is not None:
            paints.append((uid, PROBE_SOURCE, result.probe_rasters, pred.class_names, colours,
                           PROBE_LABEL))  # fmt: skip
        paint_predictions(self.session, paints)
        self.jobs.say(f"{s.name}: {pred.proba.shape[0]:,} patches predicted "
                      f"({pred.patches_per_s:.1f}/s).")  # fmt: skip

    def show_comparison(self, result: Any) -> None:
        """PathoTune and the linear probe on the same split, in a small table."""
        train = result.train
        split = result.split
        n_tr = None if split is None else split.n_train
        n_va = None if train.val_indices is None else int(np.asarray(train.val_indices).size)
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        agree = "n/a" if result.agreement is None else f"{100 * result.agreement:.1f} %"
        probe_acc = ("no embeddings" if result.probe_prediction is None
                     else fmt(result.probe_val_bal_acc))  # fmt: skip
        fill_table(self.compare_table,
                   ["classifier", "val. bal. acc.", "train", "val.", "maps agree"],
                   [(train.classifier.config.label, fmt(train.val_bal_acc), n_tr, n_va, agree),
                    ("linear probe", probe_acc, n_tr if result.probe_prediction is not None
                     else None, n_va if result.probe_prediction is not None else None,
                     agree)])  # fmt: skip
        self.compare_table.setToolTip(
            "Both classifiers trained on the same training patches and scored (balanced "
            "accuracy) on the same validation patches; 'maps agree': the share of all patches "
            "both classify alike.")
        self.compare_table.setVisible(True)

    # ================================================================== files
    def save(self, path: str | Path) -> Path | None:
        if self.classifier is None:
            self.jobs.say("Nothing to save: train a classifier first.", error=True)
            return None
        try:
            out = self.classifier.save(path)
        except USER_ERRORS as exc:
            self.jobs.say(f"Not saved: {exc}", error=True)
            return None
        self.jobs.say(f"PathoTune classifier saved to {out}.")
        show_info(f"PathoTune classifier saved to {out}")
        return out

    def load(self, path: str | Path) -> Any:
        """Read a classifier file with the one loader
        (:func:`napari_gpfm.jobs.classifiers.load_classifier`) as a background job (a PathoTune
        file builds its backbone: seconds); this dock predicts pixels, so a linear probe is
        refused, pointing to the Annotate dock. Returns the job's worker (``None`` while a job
        runs); the classifier is :attr:`classifier` once it has ended."""
        from ..jobs.classifiers import load_classifier
        from ..jobs.progress import Progress

        if self.jobs.busy:
            return None
        path = Path(path)

        def job() -> Any:
            yield Progress("load classifier", "loading", status="started",
                           message=f"reading {path.name} and building its backbone…")
            return load_classifier(path)

        def loaded(clf: Any) -> None:
            if clf.kind != "pathotune":
                self.jobs.say(f"{path}: a {clf.kind} classifier (on stored embeddings), not a "
                              "PathoTune one: apply it in the Annotate dock.", error=True)
                return
            self.classifier = clf
            for i, n in enumerate(clf.class_names):
                self.session.palette.ensure(n, None if clf.colours is None else clf.colours[i])
            self.session.set_classifier(SOURCE, clf)
            self.scores.setText(f"loaded {path.name}: {clf.config.label} on "
                                f"{clf.encoder.card.name}, classes {', '.join(clf.class_names)}")
            self.jobs.say(f"Loaded {path.name}.")

        def failed(exc: BaseException) -> bool | None:
            if isinstance(exc, USER_ERRORS):  # the message names the file and the problem
                self.jobs.say(str(exc), error=True)
                return True
            return None

        return self.jobs.run(job, on_result=loaded, on_error=failed,
                             message=f"Loading {path.name}…")

    def _save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save PathoTune classifier", "",
                                              "PathoTune (*.safetensors)")  # fmt: skip
        if path:
            self.save(path)

    def _load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load PathoTune classifier", "",
                                              "PathoTune (*.safetensors)")  # fmt: skip
        if path:
            self.load(path)
