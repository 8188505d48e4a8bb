"""'Annotate and classify' dock: class palette, annotation layers, live probe, classifiers.

Thin over the window's :class:`~napari_gpfm.layers.session.ViewerSession` (shared with every
other dock) and :func:`napari_gpfm.jobs.probe_job`:

- the class palette is the session's (PathoTune uses the same one); it is kept in the project
  folder (the session's output folder) as ``classes.json`` (:func:`palette_path`);
- slides are the session's; a slide's features are the store the session knows
  (:meth:`~napari_gpfm.layers.session.ViewerSession.find_store`), so embeddings computed in the
  GPFM dock show here at once (``store`` event), whichever dock was opened first;
- every Shapes layer (this dock's, napari's own "new shapes layer", an imported GeoJSON) gives
  newly drawn shapes the active class (:func:`attach_active_class`);
- live mode retrains 300 ms after the last edit of the annotation (Shapes) or paint (Labels)
  layer, in a :class:`~._jobs.JobPanel`; an edit arriving during a run cancels it and starts
  again. The class map is painted as soon as the probe is fitted (before the
  cross-validation) through :meth:`~napari_gpfm.layers.session.ViewerSession.set_prediction`,
  aligned with the slide layer wherever it sits, and the probe becomes the session's
  ``"probe"`` classifier.

Annotation layers made here sit on their slide (its scale and translate; they move and are
renamed with it); shapes are read relative to the current slide layer, so a slide placed
anywhere in the world (``translate``) is labelled correctly.

Honest feedback: the labelled patches per class are listed in a table as soon as a run has
labelled them, and a warning stays visible while a class has fewer than
:data:`MIN_CLASS_PATCHES` labelled patches or the validation (the cross-validation scores every
labelled patch once) holds fewer than :data:`MIN_VALIDATION_PATCHES` (:func:`sample_warnings`,
shared with the PathoTune dock).

Exports open a file dialog in the project folder (the session's output folder): the
annotations as QuPath GeoJSON, and the class map as a full-resolution pyramid TIFF (the slide's
level-0 size, or a resolution the user picks; :func:`ask_downsample`) with the per-patch table
(CSV: class and probabilities) and the class regions (GeoJSON) beside it, written in the
background (:func:`map_export_job`).

The first class map a process paints makes napari compile its numba label-colour kernels
(seconds); :func:`~napari_gpfm._qt._jobs.warm_label_painting` does that in a worker thread
once per process (started when the dock opens, and before every job), so the window never
freezes for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QColorDialog,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..annotations.classes import ClassPalette, palette_path
from ..annotations.geojson import read_geojson, write_geojson
from ..embeddings import StoreError
from ..layers.annotation_layers import (
    annotation_layer_data,
    annotations_from_layer,
    apply_class_colours,
    attach_active_class,
    class_colormap,
    labels_from_paint_layer,
    paint_layer_data,
    relative_to_slide,
    set_class_of,
)
from ..layers.convert import META_KEY
from ..layers.session import result_name, session_for
from ._jobs import JobPanel, scrolling_layout, settle_width, start_warming, tap
from .gpfm_widget import fill_slide_combo

__all__ = ["AnnotateWidget", "ask_downsample", "files_job", "map_export_job",
           "paint_predictions", "relative_to_slide", "sample_warnings"]

DEBOUNCE_MS = 300
CV_FOLDS = 5
SOURCE = "probe"  # the session's classifier / prediction key
#: What a probe run imports (done in its worker without garbage collections: see quiet_gc).
PROBE_IMPORTS = ("sklearn.linear_model", "sklearn.preprocessing", "sklearn.pipeline",
                 "sklearn.model_selection")
#: What the dock catches from the package and shows (never a bare ``Exception``).
USER_ERRORS = (ValueError, LookupError, OSError, StoreError)
NO_STORE = ("{name}: no embeddings yet. Compute them in the GPFM dock "
            "(Plugins > napari-gpfm > GPFM).")
#: Fewer labelled patches than this in a class: its scores mean little (a warning is shown).
MIN_CLASS_PATCHES = 20
#: Fewer validation patches than this: the balanced accuracy is unreliable (a warning is shown).
MIN_VALIDATION_PATCHES = 30
WARNING_STYLE = "color: #ffb74d;"
#: Map export resolutions offered: (label, level-0 pixels per map pixel).
RESOLUTIONS = (("full resolution (the slide's level 0)", 1.0), ("1/2", 2.0), ("1/4", 4.0),
               ("1/8", 8.0), ("1/16", 16.0), ("1/32", 32.0))


# ====================================================================== honest feedback
def sample_warnings(counts: Mapping[str, int], n_validation: int | None,
                    validation: str = "the validation") -> list[str]:  # fmt: skip
    """Why the scores of a classifier trained on these labelled patches should not be
    trusted yet: classes with fewer than :data:`MIN_CLASS_PATCHES` labelled patches, and a
    validation of fewer than :data:`MIN_VALIDATION_PATCHES` patches (``None``: no validation
    count to judge). Empty when both are large enough."""
    out = []
    few = [f"{name} {int(n)}" for name, n in counts.items() if int(n) < MIN_CLASS_PATCHES]
    if few:
        out.append(f"Few labelled patches ({', '.join(few)}; fewer than {MIN_CLASS_PATCHES} "
                   "per class): annotate more of each class before trusting the scores.")
    if n_validation is not None and n_validation < MIN_VALIDATION_PATCHES:
        out.append(f"{validation[0].upper()}{validation[1:]} holds only {int(n_validation)} "
                   f"patches (fewer than {MIN_VALIDATION_PATCHES}): the balanced accuracy "
                   "is not reliable.")
    return out


def show_warnings(label: QLabel, warnings: Sequence[str]) -> None:
    """A visible, coloured warning line per item (the label hides when there is none)."""
    label.setText("\n".join(f"⚠ {w}" for w in warnings))
    label.setVisible(bool(warnings))


def fill_table(table: QTableWidget, headers: Sequence[str], rows: Sequence[Sequence[Any]],
               row_names: Sequence[str] | None = None,
               colours: Sequence[Any] | None = None) -> None:  # fmt: skip
    """Fill a small read-only table (cells as text; an optional colour swatch per row)."""
    table.clear()
    table.setColumnCount(len(headers))
    table.setRowCount(len(rows))
    table.setHorizontalHeaderLabels(list(headers))
    if row_names is not None:
        table.setVerticalHeaderLabels(list(row_names))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            item = QTableWidgetItem("-" if value is None else str(value))
            if c == 0 and colours is not None and colours[r] is not None:
                item.setIcon(_swatch(tuple(int(v) for v in colours[r][:3])))
            table.setItem(r, c, item)
    height = table.horizontalHeader().height() + 4
    for r in range(len(rows)):
        height += table.rowHeight(r)
    table.setFixedHeight(max(height, 24))


def small_table() -> QTableWidget:
    table = QTableWidget(0, 0)
    table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    table.verticalHeader().setVisible(False)
    table.setFixedHeight(24)
    return table


# ====================================================================== stall-free painting
def paint_predictions(session: Any, predictions: Sequence[tuple], done: Callable | None = None
                      ) -> None:  # fmt: skip
    """Paint classifiers' predictions as :meth:`ViewerSession.set_prediction` does (class map,
    a probability map per class, uncertainty; the same names, placement and metadata), but one
    layer per turn of the Qt event loop: napari needs a good fraction of a second to add a
    layer on a busy machine, so several at once froze the window. The class maps come first
    (the first one at once), then the other maps; the session records each prediction (and
    emits ``prediction``) once its layers are all there, then ``done()`` is called.

    ``predictions``: ``(slide uid, source, rasters, class names, colours, label)`` tuples
    (``label`` ``None``: the source names the layers, ``"<slide> · <label> classes"``)."""
    from ..layers.annotation_layers import prediction_layer_data
    from ..layers.convert import upsert_layer

    first: list[tuple] = []
    rest: list[tuple] = []
    finish: list[tuple] = []
    for uid, source, rasters, names, colours, label in predictions:
        s = session.slides.get(uid)
        if s is None:
            continue
        items = prediction_layer_data(rasters, names, colours,
                                      result_name(s.name, label or source), offset=s.offset)
        for data in items:
            meta = data[1]["metadata"][META_KEY]
            meta.update(slide_uid=s.uid, source=source)
            if meta.get("kind") == "class-map":
                data[1]["features"] = {"index": np.arange(len(names) + 1),
                                       "class": ["none", *names]}  # fmt: skip
        first += [(uid, items[0])]
        rest += [(uid, d) for d in items[1:]]
        finish.append((s, source, (rasters, list(names), colours)))
    queue = first + rest

    def step() -> None:
        viewer = session.viewer
        while queue:
            uid, data = queue.pop(0)
            if uid in session.slides and viewer is not None:
                upsert_layer(viewer, data)
                if queue:
                    QTimer.singleShot(0, step)
                    return
        for s, source, value in finish:
            if s.uid in session.slides:
                s.predictions[source] = value
                publish = getattr(session, "_publish", None)  # results as plain layer data
                if publish is not None:
                    publish(s)
                session.events.prediction(value=(s.uid, source))
        if done is not None:
            done()

    step()


# ====================================================================== exports
def ask_downsample(parent: QWidget, level0_size: Sequence[int]) -> float | None:
    """Ask at which resolution to export a map (full resolution first); ``None``: cancelled."""
    w, h = (int(v) for v in level0_size)
    labels = [f"{text}: {-(-w // int(d)):,} × {-(-h // int(d)):,} px" for text, d in RESOLUTIONS]
    item, ok = QInputDialog.getItem(parent, "Map resolution",
                                    "Export the map (a pyramid TIFF, values per pixel) at:",
                                    labels, 0, False)  # fmt: skip
    if not ok or item not in labels:
        return None
    return RESOLUTIONS[labels.index(item)][1]


def files_job(write: Callable[[], list[Path]], what: str) -> Generator[Any, None, list[Path]]:
    """``write()`` (which writes files and returns their paths) as a job, in the worker: a
    busy bar saying ``what``; returns the paths."""
    from ..jobs.progress import Progress

    yield Progress("export", "writing", status="started", message=f"{what}…")
    files = write()
    yield Progress("export", "writing", 1, 1, status="done", message=f"wrote {len(files)} file(s)")
    return files


def map_export_job(maps: Sequence[tuple[Path, Any, dict]], level0_size: Sequence[int],
                   downsample: float, mpp: float | None,
                   then: Callable[[], list[Path]] | None = None,
                   ) -> Generator[Any, None, list[Path]]:  # fmt: skip
    """Write full-resolution map TIFFs (``(path, raster, metadata)`` each) as a job: one
    ``Progress`` per quarter second with the tiles written; closing the generator stops the
    current map (nothing is left under its name). ``then()`` (optional, in the worker) writes
    the per-patch files and returns their paths. Returns every path written."""
    from ..analyses.export import map_tile_count, write_map_tiff
    from ..jobs.progress import Meter

    per_map = map_tile_count(level0_size, downsample)
    meter = Meter("export", "writing maps", per_map * len(maps), "tiles")
    stop = threading.Event()
    written: list[Path] = []
    try:
        for i, (path, raster, meta) in enumerate(maps):
            state: dict[str, Any] = {"done": 0}

            def work(path=path, raster=raster, meta=meta, state=state) -> None:
                try:
                    write_map_tiff(path, raster, level0_size, downsample, mpp=mpp,
                                   metadata=meta, stop=stop,
                                   progress=lambda d, _n: state.__setitem__("done", d))
                except BaseException as exc:  # noqa: BLE001 - re-raised in the job
                    state["error"] = exc

            thread = threading.Thread(target=work, name="napari-gpfm map export", daemon=True)
            thread.start()
            while thread.is_alive():
                thread.join(0.25)
                yield meter.progress(i * per_map + state["done"], "running",
                                     f"{Path(path).name}: {state['done']:,} / {per_map:,} "
                                     "tiles")  # fmt: skip
            if "error" in state:
                raise state["error"]
            written.append(Path(path))
        if then is not None:
            written += then()
        yield meter.progress(per_map * len(maps), "done", f"wrote {len(written)} file(s)")
    finally:
        stop.set()
    return written


def _swatch(rgb: tuple[int, int, int]) -> QIcon:
    pix = QPixmap(14, 14)
    pix.fill(QColor(*rgb))
    return QIcon(pix)


def _is_paint(layer: Any) -> bool:
    meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    return type(layer).__name__ == "Labels" and isinstance(meta, dict) \
        and meta.get("kind") == "class-paint"  # fmt: skip


class _Relay(QObject):
    """Carries a job's records from its worker thread to the dock. Not a child of the dock: it
    lives as long as the job, so a job outliving a closed dock never emits on a deleted
    object (Qt drops the connection to the deleted dock)."""

    record = Signal(object)


def _teardown(palette: ClassPalette, palette_cb: Callable, disconnects: list[Callable],
              detaches: dict[int, Callable], running: dict[str, Any]) -> Callable:  # fmt: skip
    """A slot undoing the dock's connections to longer-lived objects (the session's palette
    and events, the layer list, the Shapes layers) and stopping its job once the dock is
    deleted (a closure: the widget itself is gone by then)."""

    def run(*_: Any) -> None:
        worker = running.pop("worker", None)
        if worker is not None:
            worker.quit()
        palette.disconnect(palette_cb)
        for fn in disconnects + list(detaches.values()):
            try:
                fn()
            except (RuntimeError, TypeError, ValueError):
                pass  # the layer or viewer went first
        detaches.clear()

    return run


class AnnotateWidget(QWidget):
    """Annotate classes on a slide and train / apply a linear probe on its embeddings.

    ``napari_viewer`` is injected by napari (each dock gets its own proxy of the viewer; the
    session behind them is one).
    """

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.palette: ClassPalette = self.session.palette
        self.probe = None
        self.report = None
        self.labels = None
        self._rerun = False
        self._generation = 0
        self._notes: list[str] = []  # the current run's notes on unusable shapes
        self._shown_uid: int | None = None  # the slide whose store was looked up
        self._watched: list[Any] = []  # emitters connected to _on_annotations_changed
        self._detach: dict[int, Callable[[], None]] = {}  # Shapes layer uid -> detach
        self._running: dict[str, Any] = {}  # "worker": the probe job's worker while it runs
        self._chosen: tuple | None = None  # (Shapes uid, paint uid) whose edits are watched
        self._predictions: dict[int, Any] = {}  # slide uid -> the probe's last Prediction
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_debounced)
        self._build()
        settle_width(self)
        self._connect()
        self._load_palette()
        self._fill_palette()
        for layer in self.layers:
            self._attach(layer)
        self._update_layer_lists()
        start_warming()

    @property
    def layers(self) -> Any:
        """The window's layer list (the real one, so that layers compare by identity)."""
        return self.session.viewer.layers

    # ================================================================== UI
    def _build(self) -> None:
        self.slide_combo = QComboBox()
        self.store_edit = QLineEdit()  # the store's path, to read or copy
        self.store_edit.setReadOnly(True)
        self.store_edit.setPlaceholderText("the slide's feature file (.h5)")
        self.store_label = QLabel("-")
        self.store_label.setWordWrap(True)
        self.store_button = QPushButton("…")
        self.store_button.setFixedWidth(28)
        self.store_button.setToolTip(
            "Use a feature file (.h5, e.g. from TRIDENT or the napari-gpfm CLI) for this slide. "
            "Embeddings computed in the GPFM dock are picked up automatically.")

        self.class_list = QListWidget()
        self.class_list.setMaximumHeight(120)
        self.class_name_edit = QLineEdit()
        self.class_name_edit.setPlaceholderText("class name")
        self.add_button = QPushButton("Add")
        self.rename_button = QPushButton("Rename")
        self.colour_button = QPushButton("Colour…")
        self.remove_button = QPushButton("Remove")

        self.layer_combo = QComboBox()
        self.paint_combo = QComboBox()
        self.new_layer_button = QPushButton("New shapes layer")
        self.new_paint_button = QPushButton("New paint layer")
        self.import_button = QPushButton("Import GeoJSON…")
        self.export_button = QPushButton("Export GeoJSON…")
        self.set_class_button = QPushButton("Give selected shapes the active class")

        self.min_fraction = QDoubleSpinBox()
        self.min_fraction.setRange(0.05, 1.0)
        self.min_fraction.setSingleStep(0.05)
        self.min_fraction.setValue(0.5)
        self.live_check = QCheckBox("Live")
        self.train_button = QPushButton("Train now")
        self.jobs = JobPanel("Linear probe", self.session, [self.train_button])
        self.status_label = self.jobs.status
        self.labels_label = QLabel("")
        self.labels_label.setWordWrap(True)
        self.accuracy_label = QLabel("")
        self.accuracy_label.setWordWrap(True)
        self.counts_table = small_table()  # labelled patches per class, as soon as known
        self.counts_table.setToolTip("Patches labelled by your annotations, per class (a patch "
                                     "is labelled when a class covers at least the minimum "
                                     "fraction of it).")  # fmt: skip
        self.warning_label = QLabel("")
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet(WARNING_STYLE)
        self.warning_label.setVisible(False)
        self.table = QTableWidget(0, 0)
        self.export_map_button = QPushButton("Export class map…")
        self.export_map_button.setToolTip(
            "The probe's class map of this slide as a pyramid TIFF at the slide's full "
            "resolution (or a resolution you pick), with the per-patch table (CSV) and the "
            "class regions (QuPath GeoJSON) beside it.")

        self.save_button = QPushButton("Save classifier…")
        self.load_button = QPushButton("Load classifier…")
        self.apply_button = QPushButton("Apply to open slides")
        self.apply_label = QLabel("")
        self.apply_jobs = JobPanel("Apply classifier", self.session,
                                   [self.apply_button, self.export_map_button])
        self.apply_label.setWordWrap(True)

        src = QFormLayout()
        src.addRow("Slide", self.slide_combo)
        row = QHBoxLayout()
        row.addWidget(self.store_edit)
        row.addWidget(self.store_button)
        src.addRow("Features", row)
        src.addRow(self.store_label)

        classes = QGroupBox("Classes")
        cl = QGridLayout(classes)
        cl.addWidget(self.class_list, 0, 0, 1, 4)
        cl.addWidget(self.class_name_edit, 1, 0, 1, 4)
        for i, b in enumerate((self.add_button, self.rename_button, self.colour_button,
                               self.remove_button)):  # fmt: skip
            cl.addWidget(b, 2, i)

        ann = QGroupBox("Annotations")
        al = QFormLayout(ann)
        al.addRow("Shapes", self.layer_combo)
        al.addRow("Paint", self.paint_combo)
        al.addRow(_row(self.new_layer_button, self.new_paint_button))
        al.addRow(_row(self.import_button, self.export_button))
        al.addRow(self.set_class_button)

        train = QGroupBox("Linear probe")
        tl = QVBoxLayout(train)
        tl.addLayout(_row(QLabel("min. fraction"), self.min_fraction, self.live_check,
                          self.train_button))
        for w in (self.jobs, self.counts_table, self.warning_label, self.labels_label,
                  self.accuracy_label, self.table):
            tl.addWidget(w)
        tl.addLayout(_row(self.save_button, self.load_button))
        tl.addLayout(_row(self.apply_button, self.export_map_button))
        tl.addWidget(self.apply_jobs)
        tl.addWidget(self.apply_label)

        layout = scrolling_layout(self)
        from .reader_choice import reader_choice_panel

        layout.addWidget(reader_choice_panel(self.viewer))
        layout.addLayout(src)
        layout.addWidget(classes)
        layout.addWidget(ann)
        layout.addWidget(train)
        layout.addStretch(1)
        self.slide_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.slide_combo.setMinimumContentsLength(12)
        self.jobs.say("Open a slide, compute its embeddings in the GPFM dock, add two classes "
                      "and draw them.")  # fmt: skip

    def _connect(self) -> None:
        # Qt's clicked(bool) would arrive as the first argument: every slot is a lambda
        self.slide_combo.currentIndexChanged.connect(lambda _: self._on_slide_changed())
        self.store_button.clicked.connect(lambda: self._browse_store())
        self.class_list.currentRowChanged.connect(self._on_class_row)
        self.add_button.clicked.connect(
            lambda: self._guard(self.add_class, self.class_name_edit.text()))
        self.class_name_edit.returnPressed.connect(
            lambda: self._guard(self.add_class, self.class_name_edit.text()))
        self.rename_button.clicked.connect(lambda: self._rename_clicked())
        self.colour_button.clicked.connect(lambda: self._colour_clicked())
        self.remove_button.clicked.connect(lambda: self._remove_clicked())
        self.layer_combo.currentIndexChanged.connect(lambda _: self._on_annotation_choice())
        self.paint_combo.currentIndexChanged.connect(lambda _: self._on_annotation_choice())
        self.new_layer_button.clicked.connect(lambda: self._guard(self.new_annotation_layer))
        self.new_paint_button.clicked.connect(lambda: self._guard(self.new_paint_layer))
        self.import_button.clicked.connect(lambda: self._import_clicked())
        self.export_button.clicked.connect(lambda: self._export_clicked())
        self.set_class_button.clicked.connect(lambda: self.set_class_of_selected())
        self.min_fraction.valueChanged.connect(lambda _: self._schedule())
        self.live_check.toggled.connect(lambda on: self._timer.start() if on else None)
        self.train_button.clicked.connect(lambda: self.retrain())
        self.save_button.clicked.connect(lambda: self._save_clicked())
        self.load_button.clicked.connect(lambda: self._load_clicked())
        self.apply_button.clicked.connect(lambda: self.apply_to_open_slides())
        self.export_map_button.clicked.connect(lambda: self.export_class_map())
        self.jobs.finished.connect(self._on_job_finished)

        self.palette.connect(self._on_palette_changed)
        layers = self.layers
        ev = self.session.events
        hooks = [(layers.events.inserted, self._on_inserted),
                 (layers.events.removed, self._on_removed),
                 (ev.slides, self._update_layer_lists), (ev.store, self._on_store),
                 (ev.out_dir, self._on_out_dir), (ev.classifier, self._on_classifier)]  # fmt: skip
        for emitter, cb in hooks:
            emitter.connect(cb)
        disconnects = [lambda e=e, c=c: e.disconnect(c) for e, c in hooks]
        self.destroyed.connect(_teardown(self.palette, self._on_palette_changed, disconnects,
                                         self._detach, self._running))  # fmt: skip

    def _guard(self, fn: Callable, *args: Any) -> Any:
        """Run a user action; the package's errors are shown, not raised."""
        try:
            return fn(*args)
        except USER_ERRORS as exc:
            self._error(str(exc) or type(exc).__name__)
            return None

    def _error(self, message: str) -> None:
        self.jobs.say(message, error=True)
        show_error(message)

    def say(self, text: str, error: bool = False) -> None:
        self.jobs.say(text, error)

    # ================================================================== slides and stores
    def current_uid(self) -> int | None:
        return self.slide_combo.currentData()

    def slide_state(self) -> Any:
        """The current slide's state in the session (``None`` without a slide)."""
        return self.session.slides.get(self.current_uid())

    def slide_layer(self) -> Any:
        s = self.slide_state()
        return None if s is None else s.layer

    def select_slide(self, key: Any) -> None:
        """Make a slide (layer, name or uid) the dock's current slide."""
        s = self.session.slide(key)
        self.slide_combo.setCurrentIndex(self.slide_combo.findData(s.uid))

    def mpp(self) -> float | None:
        s = self.slide_state()
        return None if s is None else s.mpp

    def offset(self) -> tuple[float, float]:
        s = self.slide_state()
        return (0.0, 0.0) if s is None else s.offset

    def store(self) -> Any:
        """The current slide's feature store (looked up in the session), or ``None``."""
        s = self.slide_state()
        if s is None:
            return None
        if s.store is None:
            try:
                self.session.find_store(s.uid)
            except USER_ERRORS as exc:
                self.store_label.setText(f"{s.name}: {exc}")
        return s.store

    def set_store(self, store_or_path: Any, slide: Any = None) -> Any:
        """Use a feature store (object or path) for a slide (default: the current one); every
        dock sees it. Returns the store, or ``None`` (the reason is shown)."""
        try:
            s = self.session.slide(slide if slide is not None else self.current_uid())
        except LookupError:
            self._error("Open a whole-slide image first (File > Open, or napari-gpfm's sample).")
            return None
        try:
            if isinstance(store_or_path, (str, Path)):
                store = self.session.use_store_file(s.uid, store_or_path)
            else:
                store = store_or_path
                self.session.attach_store(s.uid, store)
        except USER_ERRORS as exc:
            self._error(str(exc))
            return None
        return store

    def _browse_store(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Feature file", str(self.session.out_dir),
                                              "Features (*.h5)")  # fmt: skip
        if path:
            self.set_store(path)

    def _on_slide_changed(self) -> None:
        self._shown_uid = self.current_uid()
        self.store()
        self._show_store()
        self._schedule()

    def _show_store(self) -> None:
        s = self.slide_state()
        self.store_edit.setText("" if s is None or s.store is None else str(s.store.path))
        if s is None:
            self.store_label.setText("Open a whole-slide image (File > Open).")
        elif s.store is None:
            self.store_label.setText(NO_STORE.format(name=s.name))
        else:
            self.store_label.setText(f"{s.name}: {s.store.describe()}")

    def _on_store(self, event: Any) -> None:
        self._save_palette()  # the project folder exists now
        if event.value == self.current_uid():
            self._show_store()
            self._schedule()

    def _on_classifier(self, event: Any) -> None:
        """A linear probe trained, loaded or restored elsewhere (a project) is this dock's too."""
        if event.value == SOURCE:
            self.probe = self.session.classifiers.get(SOURCE)

    def _on_out_dir(self, event: Any = None) -> None:
        self._load_palette()
        self._save_palette()
        s = self.slide_state()
        if s is not None and s.store is None:
            self._on_slide_changed()

    # ================================================================== layer lists
    def _on_inserted(self, event: Any) -> None:
        self._attach(event.value)
        self._update_layer_lists()

    def _on_removed(self, event: Any) -> None:
        detach = self._detach.pop(int(event.value.unique_id), None)
        if detach is not None:
            detach()
        self._update_layer_lists()

    def _attach(self, layer: Any) -> None:
        """Every Shapes layer gives its newly drawn shapes the active class."""
        uid = int(layer.unique_id)
        if type(layer).__name__ != "Shapes" or uid in self._detach:
            return
        self._detach[uid] = attach_active_class(layer, lambda: self.palette.active,
                                                self.palette)

    def _layer_by_uid(self, uid: Any) -> Any:
        if uid is None:
            return None
        return next((la for la in self.layers if int(la.unique_id) == uid), None)

    def _update_layer_lists(self, event: Any = None) -> None:
        fill_slide_combo(self.slide_combo, self.session)
        for combo, layers, empty in (
            (self.layer_combo, [la for la in self.layers if type(la).__name__ == "Shapes"],
             False),
            (self.paint_combo, [la for la in self.layers if _is_paint(la)], True),
        ):  # fmt: skip
            current = combo.currentData()
            uids = [int(la.unique_id) for la in layers]
            combo.blockSignals(True)
            combo.clear()
            if empty:
                combo.addItem("", None)
            for la, uid in zip(layers, uids, strict=True):
                combo.addItem(la.name, uid)
            if current in uids:
                combo.setCurrentIndex(combo.findData(current))
            elif not empty and uids:
                combo.setCurrentIndex(len(uids) - 1)  # the newest Shapes layer
            combo.blockSignals(False)
        if self.current_uid() != self._shown_uid:
            self._on_slide_changed()  # a first slide, or the current one was closed
        else:
            self._show_store()
        self._on_annotation_choice()

    # ================================================================== palette
    def _palette_file(self) -> Path:
        return palette_path(self.session.out_dir)

    def _load_palette(self) -> None:
        """Classes saved with the project join the palette (all of them when it is empty)."""
        path = self._palette_file()
        if not path.is_file():
            return
        try:
            saved = ClassPalette.load(path)
        except (ValueError, OSError) as exc:
            self.say(f"Classes not loaded: {exc}", error=True)
            return
        if len(self.palette) == 0:
            self.palette.update_from(saved)
        else:
            for spec in saved:
                if spec.name not in self.palette:
                    self.palette.ensure(spec.name, spec.colour)

    def _save_palette(self) -> None:
        """Keep the classes in the project (output) folder, once that folder exists."""
        if len(self.palette) == 0 or not self.session.out_dir.is_dir():
            return
        try:
            self.palette.save(self._palette_file())
        except OSError as exc:
            self.say(f"Classes not saved: {exc}", error=True)

    def _fill_palette(self) -> None:
        self.class_list.blockSignals(True)
        self.class_list.clear()
        for spec in self.palette:
            self.class_list.addItem(QListWidgetItem(_swatch(spec.colour), spec.name))
        if self.palette.active in self.palette:
            self.class_list.setCurrentRow(self.palette.index(self.palette.active))
        self.class_list.blockSignals(False)

    def _on_palette_changed(self, palette: ClassPalette) -> None:
        self._fill_palette()
        shapes = self.annotation_layer()
        if shapes is not None:
            apply_class_colours(shapes, palette)
        paint = self.paint_layer()
        if paint is not None:
            self._sync_paint(paint)
        self._save_palette()
        self._schedule()

    def _sync_paint(self, paint: Any) -> None:
        """The paint layer's colours follow the palette; it paints the active class."""
        paint.colormap = class_colormap(self.palette.names, self.palette.colours())
        if self.palette.active in self.palette:
            paint.selected_label = self.palette.index(self.palette.active) + 1

    def _on_class_row(self, row: int) -> None:
        if 0 <= row < len(self.palette):
            self.palette.set_active(self.palette.names[row])

    def add_class(self, name: str, colour: Any = None) -> Any:
        spec = self.palette.add(name, colour)
        self.class_name_edit.clear()
        return spec

    def set_active_class(self, name: str) -> None:
        self.palette.set_active(name)

    def _rename_clicked(self) -> None:
        old, new = self.palette.active, self.class_name_edit.text()
        if old is not None:
            self._guard(self.rename_class, old, new)

    def rename_class(self, old: str, new: str) -> None:
        """Rename a class in the palette and on every shape that has it."""
        self.palette.rename(old, new)
        for layer in self.layers:
            if type(layer).__name__ == "Shapes" and "class" in layer.features.columns:
                idx = np.nonzero(layer.features["class"].astype(str).to_numpy() == old)[0]
                if idx.size:
                    set_class_of(layer, idx, new)
        self.class_name_edit.clear()

    def _colour_clicked(self) -> None:
        name = self.palette.active
        if name is None:
            return
        colour = QColorDialog.getColor(QColor(*self.palette.colour(name)), self, name)
        if colour.isValid():
            self.palette.recolour(name, (colour.red(), colour.green(), colour.blue()))

    def _remove_clicked(self) -> None:
        if self.palette.active is not None:
            self.palette.remove(self.palette.active)

    # ================================================================== annotation layers
    def annotation_layer(self) -> Any:
        return self._layer_by_uid(self.layer_combo.currentData())

    def paint_layer(self) -> Any:
        return self._layer_by_uid(self.paint_combo.currentData())

    def _on_annotation_choice(self) -> None:
        """Listen to the chosen Shapes and paint layers' edits (only when the choice changed:
        result layers arriving must not recolour every shape again)."""
        chosen = (self.layer_combo.currentData(), self.paint_combo.currentData())
        if chosen == self._chosen and all(self._layer_by_uid(u) is not None
                                          for u in chosen if u is not None):  # fmt: skip
            return
        self._chosen = chosen
        for emitter in self._watched:
            emitter.disconnect(self._on_annotations_changed)
        self._watched = []
        shapes, paint = self.annotation_layer(), self.paint_layer()
        if shapes is not None:
            apply_class_colours(shapes, self.palette)
            self._watched += [shapes.events.data, shapes.events.features]
        if paint is not None:
            self._watched += [paint.events.paint, paint.events.data]
        for emitter in self._watched:
            emitter.connect(self._on_annotations_changed)

    def _slide_placement(self, kwargs: dict) -> dict:
        """LayerData kwargs of a layer made for the current slide: on the slide (its translate
        added), moved and renamed with it by the session."""
        s = self.slide_state()
        if s is None:
            return kwargs
        t = np.asarray(kwargs.get("translate", (0.0, 0.0)), dtype=float) + np.asarray(s.offset)
        kwargs["translate"] = tuple(float(v) for v in t)
        meta = kwargs["metadata"][META_KEY]
        meta.update(slide_uid=s.uid, slide_layer=s.name)
        return kwargs

    def new_annotation_layer(self, annotations: Any = (), name: str | None = None) -> Any:
        """A Shapes layer over the current slide holding ``annotations`` (level-0 px)."""
        s = self.slide_state()
        base = s.name if s is not None else None
        data, kwargs, _ = annotation_layer_data(
            list(annotations), self.palette, self.mpp(),
            name or (result_name(base, "annotations") if base else "annotations"), base,
        )  # fmt: skip
        layer = self.session.viewer.add_shapes(data, **self._slide_placement(kwargs))
        self.layer_combo.setCurrentIndex(self.layer_combo.findData(int(layer.unique_id)))
        return layer

    def new_paint_layer(self, cell: int = 16) -> Any:
        """A Labels layer over the current slide to paint classes (one pixel: ``cell`` level-0
        pixels); it paints the active class."""
        s = self.slide_state()
        if s is None:
            self._error("Open a whole-slide image first (File > Open, or napari-gpfm's sample).")
            return None
        data, kwargs, _ = paint_layer_data(s.slide.dimensions, s.mpp, self.palette, int(cell),
                                           result_name(s.name, "class paint"))  # fmt: skip
        layer = self.session.viewer.add_labels(data, **self._slide_placement(kwargs))
        self._sync_paint(layer)
        self.paint_combo.setCurrentIndex(self.paint_combo.findData(int(layer.unique_id)))
        return layer

    def _on_annotations_changed(self, event: Any = None) -> None:
        self._schedule()

    def _schedule(self) -> None:
        self._timer.start()  # (re)start the debounce

    def _on_debounced(self) -> None:
        shapes = self.annotation_layer()
        if shapes is not None:
            apply_class_colours(shapes, self.palette)
        if self.live_check.isChecked():
            self.retrain()

    def set_class_of_selected(self) -> None:
        layer = self.annotation_layer()
        if layer is None or self.palette.active is None or not layer.selected_data:
            return
        set_class_of(layer, sorted(layer.selected_data), self.palette.active)

    def import_geojson(self, path: str | Path) -> Any:
        """QuPath GeoJSON → a new Shapes layer over the current slide; the file's classes and
        colours join the palette."""
        anns = read_geojson(path)
        for a in anns:
            if a.class_name:
                self.palette.ensure(a.class_name, a.color, overwrite_colour=True)
        s = self.slide_state()
        stem = Path(path).stem
        return self.new_annotation_layer(anns, result_name(s.name, stem) if s else stem)

    def export_geojson(self, path: str | Path) -> str:
        """The chosen Shapes layer as QuPath GeoJSON (level-0 px of the current slide),
        written atomically."""
        layer = self.annotation_layer()
        if layer is None:
            raise ValueError("no annotation (Shapes) layer to export")
        anns = annotations_from_layer(relative_to_slide(layer, self.offset()), self.mpp(),
                                      self.palette)  # fmt: skip
        return write_geojson(path, anns)

    def _import_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "QuPath GeoJSON", "",
                                              "GeoJSON (*.geojson *.json)")  # fmt: skip
        if path:
            self._guard(self.import_geojson, path)

    def _default_path(self, what: str, suffix: str) -> str:
        """``<project folder>/<slide> <what><suffix>``: where a save dialog opens."""
        s = self.slide_state()
        stem = f"{s.name}_{what}" if s is not None else what
        return str(self.session.out_dir / f"{stem}{suffix}")

    def _export_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "QuPath GeoJSON",
                                              self._default_path("annotations", ".geojson"),
                                              "GeoJSON (*.geojson)")  # fmt: skip
        if path:
            out = self._guard(self.export_geojson, path)
            if out:
                self.say(f"Annotations written to {out}.")

    def export_class_map(self, path: str | Path | None = None,
                         downsample: float | None = None) -> Any:  # fmt: skip
        """Export the probe's class map of the current slide: ``path`` (a ``.tif``; asked with
        a file dialog in the project folder when ``None``) as a pyramid TIFF at ``downsample``
        level-0 pixels per pixel (asked when ``None``: full resolution first), with
        ``<stem>.csv`` (per patch: class and probabilities) and ``<stem>.geojson`` (class
        regions) beside it. Runs in the background; returns the worker (``None`` when there
        is nothing to export or the user cancelled)."""
        s = self.slide_state()
        pred = None if s is None else self._predictions.get(s.uid)
        if pred is None or s.uid not in self.session.slides:
            self._error("Train the probe on this slide (or Apply it) before exporting its map.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Export the class map", self._default_path("probe_classes", ".tif"),
                "Pyramid TIFF (*.tif *.tiff)")  # fmt: skip
            if not path:
                return None
        size = tuple(int(v) for v in s.slide.dimensions)
        if downsample is None:
            downsample = ask_downsample(self, size)
            if downsample is None:
                return None
        path = Path(path)
        if path.suffix.lower() not in (".tif", ".tiff"):
            path = path.with_name(path.name + ".tif")
        return self.apply_jobs.run(
            class_map_export_job(pred, path, size, downsample, s.mpp),
            on_result=lambda files: self.apply_jobs.say(
                f"Wrote {len(files)} file(s): " + ", ".join(str(p) for p in files)),
            message=f"Exporting the class map of {s.name}…",
        )  # fmt: skip

    # ================================================================== training
    @property
    def busy(self) -> bool:
        return self.jobs.busy

    def _inputs(self) -> tuple:
        """(slide state, store, annotations, class names, colours, painted labels, notes) of
        the current slide; ``LookupError`` without a slide or its embeddings."""
        s = self.slide_state()
        if s is None:
            raise LookupError("Open a whole-slide image first (File > Open).")
        store = self.store()
        if store is None:
            raise LookupError(NO_STORE.format(name=s.name))
        names = self.palette.training_names
        notes: list[str] = []
        shapes = self.annotation_layer()
        anns = [] if shapes is None else annotations_from_layer(
            relative_to_slide(shapes, s.offset), s.mpp, self.palette, notes)  # fmt: skip
        extra = None
        paint = self.paint_layer()
        if paint is not None and np.any(np.asarray(paint.data)):
            extra = labels_from_paint_layer(
                relative_to_slide(paint, s.offset), s.mpp, s.coords, s.patch_size_level0,
                self.palette, names, self.min_fraction.value(),
            )  # fmt: skip
        return s, store, anns, names, self.palette.colours(names), extra, notes

    def retrain(self) -> Any:
        """Retrain now (in a worker); a run in progress is cancelled and restarted."""
        if self.jobs.busy:
            self._rerun = True
            self.jobs.cancel()
            return None
        try:
            s, store, anns, names, colours, extra, notes = self._inputs()
        except USER_ERRORS as exc:
            self.say(str(exc))
            return None
        if len(names) < 2:
            self.say("Add at least two classes to train (Classes > Add).")
            return None
        self._generation += 1
        generation, uid = self._generation, s.uid
        fraction = self.min_fraction.value()

        def train() -> Generator:  # its modules (scikit-learn's) import in the worker
            from ..analyses.classify import ProbeRequest
            from ..jobs.probe import probe_job

            return (yield from probe_job(ProbeRequest(anns, store, names, colours, fraction,
                                                      extra, CV_FOLDS)))

        job = train()
        relay = _Relay()  # (generation, slide uid, Progress) from the worker thread
        relay.record.connect(self._on_record)
        self._notes = notes
        worker = self.jobs.run(
            _tap(job, lambda p, painted: relay.record.emit((generation, uid, p, painted))),
            slide=uid, imports=PROBE_IMPORTS,
            on_result=lambda r: self._on_result(generation, uid, r),
            message=f"Training a linear probe on {s.name}…",
        )  # fmt: skip
        self._running["worker"] = worker
        return worker

    def _on_job_finished(self, outcome: str) -> None:
        self._running.pop("worker", None)
        if self._rerun:
            self._rerun = False
            self.retrain()

    def _current_run(self, generation: int, uid: int) -> bool:
        return generation == self._generation and not self._rerun and uid in self.session.slides

    def _on_record(self, item: tuple) -> None:
        """A probe run's record, on the main thread: paint the map before the CV ends (the job
        waits for the painting: see :func:`_tap`)."""
        generation, uid, p, painted = item
        update = p.data
        if not self._current_run(generation, uid) or not hasattr(update, "kind"):
            painted.set()
            return
        try:
            if update.labels is not None:
                self.labels = update.labels
                self._show_labels(update.labels)
            if update.kind == "report":
                self.report = update.report
                self._show_report(update.report)
            if update.kind != "prediction":
                painted.set()
                return
            self.probe = update.probe
            self._predictions[uid] = update.prediction
            self.session.set_classifier(SOURCE, update.probe)
            paint_predictions(self.session, [(uid, SOURCE, update.rasters,
                                              update.probe.class_names, update.probe.colours,
                                              None)], painted.set)  # fmt: skip
        except BaseException:
            painted.set()  # the job must not wait for a painting that failed
            raise

    def _on_result(self, generation: int, uid: int, result: Any) -> None:
        if not self._current_run(generation, uid):
            return
        if result.labels is not None:
            self.labels = result.labels
        if result.report is not None and result.report is not self.report:
            self.report = result.report
            self._show_report(result.report)

    def _show_labels(self, labels: Any) -> None:
        """Labelled patches per class (table), the small-sample warnings, and notes."""
        counts = {n: int(v) for n, v in labels.counts.items()}
        names = list(counts)
        fill_table(self.counts_table, ["class", "labelled patches"],
                   [(n, f"{counts[n]:,}") for n in names],
                   colours=[self.palette.colour(n) if n in self.palette else None
                            for n in names])  # fmt: skip
        # the cross-validation scores every labelled patch once (held out by its fold)
        show_warnings(self.warning_label, sample_warnings(
            counts, sum(counts.values()), "the cross-validation"))
        text = ", ".join(f"{k} {v}" for k, v in counts.items())
        parts = [f"labelled patches: {text}"]
        if len(labels.conflicts):
            pairs = sorted({"/".join(c) for c in labels.conflict_classes})
            parts.append(f"conflicts (unlabelled): {len(labels.conflicts)} patches "
                         f"({', '.join(pairs)})")  # fmt: skip
        if labels.ignored.any():
            parts.append(f"ignored: {int(labels.ignored.sum())} patches")
        parts += list(labels.skipped) + self._notes
        self.labels_label.setText("\n".join(parts))

    def _show_report(self, report: Any) -> None:
        n = int(np.asarray(report.confusion).sum())
        text = (f"balanced accuracy (CV, {report.folds} folds, {n:,} held-out patches): "
                f"{report.balanced_accuracy:.3f}")
        if self.warning_label.isVisibleTo(self):
            text += " (see the warning above)"
        if report.note:
            text += f"\n{report.note}"
        self.accuracy_label.setText(text)
        names = report.class_names
        self.table.setRowCount(len(names))
        self.table.setColumnCount(len(names) + 1)
        self.table.setHorizontalHeaderLabels([f"→ {n}" for n in names] + ["recall"])
        self.table.setVerticalHeaderLabels(names)
        for i, n in enumerate(names):
            for j in range(len(names)):
                self.table.setItem(i, j, QTableWidgetItem(str(int(report.confusion[i, j]))))
            r = report.per_class_recall.get(n)
            self.table.setItem(i, len(names), QTableWidgetItem("-" if r is None else f"{r:.2f}"))

    # ================================================================== classifier files
    def save_classifier(self, path: str | Path) -> str | None:
        if self.probe is None:
            self._error("Train a classifier first.")
            return None
        try:
            out = self.probe.save(path)
        except OSError as exc:
            self._error(f"Classifier not saved: {exc}")
            return None
        self.say(f"Classifier saved to {out}.")
        return out

    def load_classifier(self, path: str | Path) -> Any:
        """Load a classifier file of either kind (a linear probe or PathoTune, through
        :func:`napari_gpfm.jobs.classifiers.load_classifier`) and apply it to the current slide
        (refused when the slide's patches are not of the classifier's recipe), as a background
        job of the Apply panel: a PathoTune file loads its backbone and runs it over the slide's
        patches (seconds to minutes). Returns the job's worker (``None`` while another apply
        job runs); the classifier is :attr:`probe` once the job has ended."""
        from ..errors import NapariGpfmError
        from ..jobs.classifiers import load_classifier
        from ..jobs.probe import apply_job
        from ..jobs.progress import Progress

        if self.apply_jobs.busy:
            self._error("A classifier is being applied: wait for it (or Cancel) first.")
            return None
        path = Path(path)
        s = self.slide_state()
        store = self.store()
        targets = self._targets([s.uid]) if s is not None and store is not None else []

        def job() -> Generator:
            yield Progress("load classifier", "loading", status="started",
                           message=f"reading {path.name}…")
            clf = load_classifier(path)
            if store is not None:
                clf.check_store(store, source=path)
            results = (yield from apply_job(clf, targets)) if targets else []
            return clf, results

        def loaded(value: tuple) -> None:
            clf, results = value
            self.probe = clf
            for i, n in enumerate(clf.class_names):
                self.palette.ensure(n, None if clf.colours is None else clf.colours[i])
            self.session.set_classifier(SOURCE, clf)
            self.say(f"Loaded {path.name}: classes {', '.join(clf.class_names)}.")
            self.apply_jobs.say(f"Loaded {path.name}.")
            for r in results:
                self.say(r.message, error=not self._paint(r))

        def failed(exc: BaseException) -> bool | None:
            if isinstance(exc, (*USER_ERRORS, NapariGpfmError)):
                self._error(str(exc))
                self.apply_jobs.say(str(exc), error=True)
                return True
            return None

        return self.apply_jobs.run(job, on_result=loaded, on_error=failed,
                                   message=f"Loading {path.name}…")

    def _targets(self, keys: list[Any]) -> list[tuple[Any, str, Any]]:
        """(uid, name, store or None) of these slides; the session finds the stores."""
        out = []
        for key in keys:
            s = self.session.slide(key)
            try:
                store = self.session.find_store(s.uid)
            except USER_ERRORS:
                store = None
            out.append((s.uid, s.name, store))
        return out

    def _paint(self, r: Any) -> bool:
        """Paint one slide's prediction (a ``SlidePrediction``) if it has one and is open."""
        if r.prediction is None or r.key not in self.session.slides:
            return False
        pred = r.prediction
        self._predictions[int(r.key)] = pred
        paint_predictions(self.session, [(int(r.key), SOURCE, pred.rasters(), pred.class_names,
                                          pred.colours, None)])  # fmt: skip
        return True

    def apply_to_open_slides(self) -> Any:
        """Apply the classifier to every open slide in the background, one slide after the
        other with progress and Cancel; each slide gets a line in the dock (a slide without
        embeddings is named). Returns the worker."""
        from ..jobs.probe import apply_job

        if self.probe is None:
            self._error("Train or load a classifier first.")
            return None
        self.apply_label.setText("")
        targets = self._targets(list(self.session.slides))
        return self.apply_jobs.run(apply_job(self.probe, targets), on_result=self._applied,
                                   message=f"Classifying {len(targets)} slide(s)…")  # fmt: skip

    def _applied(self, results: list) -> None:
        done = sum(self._paint(r) for r in results)
        self.apply_label.setText("\n".join(r.message for r in results))
        summary = f"Classifier applied to {done} of {len(results)} open slide(s)."
        self.apply_jobs.say(summary, error=done < len(results))
        show_info(summary)

    def _save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save classifier", "", "Classifier (*.npz)")
        if path:
            self.save_classifier(path)

    def _load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load classifier", "",
            "Classifiers (*.npz *.safetensors);;Linear probe (*.npz);;PathoTune (*.safetensors)")
        if path:
            self.load_classifier(path)


def _row(*widgets: QWidget) -> QHBoxLayout:
    """The widgets side by side."""
    row = QHBoxLayout()
    for w in widgets:
        row.addWidget(w)
    return row


#: Longest a job waits for the main thread to paint its class map (a closed dock never does).
PAINT_WAIT_S = 5.0


def _tap(job: Generator, emit: Callable[[Any, threading.Event], None]) -> Generator:
    """``job``'s records through :func:`~napari_gpfm._qt._jobs.tap`, each passed to
    ``emit(record, painted)`` (from the worker thread: a queued Qt signal).

    After a record carrying a prediction the job waits (at most :data:`PAINT_WAIT_S`) until
    the main thread has set ``painted``: building layers on the main thread while the job's
    cross-validation runs in Python beside it makes both fight for the GIL, and the window
    froze for seconds (each GIL hand-over can cost the main thread a switch interval)."""
    import time

    def emit_and_wait(record: Any) -> None:
        painted = threading.Event()
        emit(record, painted)
        if getattr(record.data, "kind", None) == "prediction":
            t0 = time.perf_counter()
            while not painted.wait(0.05) and time.perf_counter() - t0 < PAINT_WAIT_S:
                pass

    return tap(job, emit_and_wait)


def class_map_export_job(pred: Any, path: Path, level0_size: Sequence[int], downsample: float,
                         mpp: float | None) -> Generator:  # fmt: skip
    """A probe prediction's class map as a pyramid TIFF at ``path``, plus ``<stem>.csv`` (per
    patch: class index and name, probability per class) and ``<stem>.geojson`` (the class
    regions as QuPath annotations) beside it; a job (see :func:`map_export_job`)."""
    from ..analyses.export import write_csv
    from ..annotations.geojson import class_polygons, write_geojson

    names = list(pred.class_names)
    raster = pred.class_raster()
    colours = None if pred.colours is None else np.asarray(pred.colours).tolist()
    meta = {"kind": "class-map", "values": "class i painted i + 1, 0 = no patch",
            "classes": ["none", *names], "colours": colours}  # fmt: skip

    def tables() -> list[Path]:
        csv = path.with_suffix(".csv")
        write_csv(csv, pred.coords, pred.columns())
        regions = path.with_suffix(".geojson")
        write_geojson(regions, class_polygons(raster, names, pred.colours))
        return [csv, regions]

    return (yield from map_export_job([(path, raster, meta)], level0_size, downsample, mpp,
                                      tables))  # fmt: skip
