"""'Annotate & classify' dock: class palette, annotation layers, live linear probe, classifiers.

Thin over ``annotations`` (palette, GeoJSON, shapes), ``layers.annotation_layers`` (layer data)
and ``analyses.classify`` (training, prediction): the widget gathers inputs, runs
:func:`~napari_gpfm.analyses.classify.live_steps` in a ``thread_worker`` and shows what it
yields. Live mode retrains 300 ms after the last edit of the annotation (Shapes) or paint
(Labels) layer; an edit arriving during a run cancels it at its next yield and starts again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
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

from ..analyses.classify import live_steps, load_classifier, predict_store
from ..annotations.classes import ClassPalette, palette_path
from ..annotations.geojson import read_geojson, write_geojson
from ..embeddings import open_store
from ..layers.annotation_layers import (
    annotation_layer_data,
    annotations_from_layer,
    apply_class_colours,
    labels_from_paint_layer,
    paint_layer_data,
    prediction_layer_data,
    set_class_of,
    set_or_add_layer,
    slide_mpp,
)
from ..layers.reader import layer_slide
from ..layers.session import explorer_for

DEBOUNCE_MS = 300
CV_FOLDS = 5


def _swatch(rgb: tuple[int, int, int]) -> QIcon:
    pix = QPixmap(14, 14)
    pix.fill(QColor(*rgb))
    return QIcon(pix)


class AnnotateWidget(QWidget):
    """Annotate classes on a slide and train / apply a linear probe on its embeddings."""

    def __init__(self, napari_viewer: Any, palette: ClassPalette | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.palette = palette or ClassPalette()
        self.stores: dict[str, Any] = {}  # slide layer name -> FeatureStore
        self.probe = None
        self.report = None
        self.labels = None
        self.project_dir: Path | None = None
        self._worker = None
        self._rerun = False
        self._generation = 0
        self._connected: list[Any] = []
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_debounced)
        self._build()
        self.palette.connect(self._on_palette_changed)
        self.explorer = explorer_for(napari_viewer)  # stores shared with the GPFM dock
        self.explorer.events.sessions.connect(self._on_session)
        self.viewer.layers.events.inserted.connect(self._update_layer_lists)
        self.viewer.layers.events.removed.connect(self._update_layer_lists)
        self._update_layer_lists()
        self._fill_palette()

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        self.slide_combo = QComboBox()
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("feature store (.h5) of the slide")
        self.store_button = QPushButton("…")
        self.store_label = QLabel("-")
        self.store_label.setWordWrap(True)

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
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.accuracy_label = QLabel("")
        self.accuracy_label.setWordWrap(True)
        self.table = QTableWidget(0, 0)

        self.save_button = QPushButton("Save classifier…")
        self.load_button = QPushButton("Load classifier…")
        self.apply_button = QPushButton("Apply to open slides")

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
                               self.remove_button)):
            cl.addWidget(b, 2, i)

        ann = QGroupBox("Annotations")
        al = QFormLayout(ann)
        al.addRow("Shapes", self.layer_combo)
        al.addRow("Paint", self.paint_combo)
        r1 = QHBoxLayout()
        r1.addWidget(self.new_layer_button)
        r1.addWidget(self.new_paint_button)
        al.addRow(r1)
        r2 = QHBoxLayout()
        r2.addWidget(self.import_button)
        r2.addWidget(self.export_button)
        al.addRow(r2)
        al.addRow(self.set_class_button)

        train = QGroupBox("Linear probe")
        tl = QVBoxLayout(train)
        r3 = QHBoxLayout()
        r3.addWidget(QLabel("min. fraction"))
        r3.addWidget(self.min_fraction)
        r3.addWidget(self.live_check)
        r3.addWidget(self.train_button)
        tl.addLayout(r3)
        tl.addWidget(self.status_label)
        tl.addWidget(self.accuracy_label)
        tl.addWidget(self.table)
        r4 = QHBoxLayout()
        r4.addWidget(self.save_button)
        r4.addWidget(self.load_button)
        tl.addLayout(r4)
        tl.addWidget(self.apply_button)

        layout = QVBoxLayout(self)
        layout.addLayout(src)
        layout.addWidget(classes)
        layout.addWidget(ann)
        layout.addWidget(train)
        layout.addStretch(1)

        self.slide_combo.currentIndexChanged.connect(self._on_slide_changed)
        self.store_button.clicked.connect(self._browse_store)
        self.store_edit.editingFinished.connect(
            lambda: self.set_store(self.store_edit.text()) if self.store_edit.text() else None)
        self.class_list.currentRowChanged.connect(self._on_class_row)
        self.add_button.clicked.connect(lambda: self._guard(self.add_class,
                                                            self.class_name_edit.text()))
        self.rename_button.clicked.connect(self._rename_clicked)
        self.colour_button.clicked.connect(self._colour_clicked)
        self.remove_button.clicked.connect(self._remove_clicked)
        self.layer_combo.currentIndexChanged.connect(self._connect_annotation_layers)
        self.paint_combo.currentIndexChanged.connect(self._connect_annotation_layers)
        self.new_layer_button.clicked.connect(self.new_annotation_layer)
        self.new_paint_button.clicked.connect(self.new_paint_layer)
        self.import_button.clicked.connect(self._import_clicked)
        self.export_button.clicked.connect(self._export_clicked)
        self.set_class_button.clicked.connect(self.set_class_of_selected)
        self.live_check.toggled.connect(lambda on: self._timer.start() if on else None)
        self.train_button.clicked.connect(self.retrain)
        self.save_button.clicked.connect(self._save_clicked)
        self.load_button.clicked.connect(self._load_clicked)
        self.apply_button.clicked.connect(self.apply_to_open_slides)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except (ValueError, KeyError) as exc:
            self._error(str(exc))
            return None

    def _error(self, message: str) -> None:
        self.status_label.setText(message)
        show_error(message)

    # ------------------------------------------------------------------ slides and stores
    def slide_layers(self) -> list:
        # result layers may keep the slide *name* under the same metadata key: skip them
        return [la for la in self.viewer.layers
                if layer_slide(la) is not None and not isinstance(layer_slide(la), str)]

    def slide_layer(self):
        name = self.slide_combo.currentText()
        return next((la for la in self.slide_layers() if la.name == name), None)

    def mpp(self) -> float | None:
        layer = self.slide_layer()
        return None if layer is None else slide_mpp(layer)

    def store(self):
        layer = self.slide_layer()
        return None if layer is None else self.stores.get(layer.name)

    def find_store(self, slide_layer) -> Any | None:
        """The slide's store: the one the GPFM dock loaded (shared ``Explorer`` session),
        ``metadata["napari_gpfm"]["store"]``, or ``<project>/features_*/<slide>.h5``."""
        session = self.explorer.sessions.get(slide_layer.name)
        if session is not None:
            return session.store
        meta = slide_layer.metadata.get("napari_gpfm", {})
        candidates = []
        if meta.get("store"):
            candidates.append(Path(meta["store"]))
        slide = layer_slide(slide_layer)
        if self.project_dir is not None and slide is not None:
            candidates += sorted(self.project_dir.glob(f"features_*/{slide.name}.h5"),
                                 key=os.path.getmtime, reverse=True)
        for path in candidates:
            try:
                return open_store(path)
            except Exception:
                continue
        return None

    def set_store(self, store_or_path, slide_layer=None):
        """Use a feature store (object or path) for a slide layer (default: the current one)."""
        layer = slide_layer or self.slide_layer()
        if layer is None:
            self._error("open a whole-slide image first")
            return None
        try:
            store = open_store(store_or_path) if isinstance(store_or_path, (str, Path)) \
                else store_or_path
        except Exception as exc:
            self._error(str(exc))
            return None
        self.stores[layer.name] = store
        session = self.explorer.sessions.get(layer.name)
        if session is None or session.store is not store:
            try:
                self.explorer.add(layer, store)
            except ValueError:
                pass  # a store without coords: usable here only if it has them anyway
        if self.project_dir is None:
            self.project_dir = Path(store.path).resolve().parent.parent
            ppath = palette_path(self.project_dir)
            if ppath.exists() and len(self.palette) == 0:
                self.palette.update_from(ClassPalette.load(ppath))
        if layer is self.slide_layer():
            self._show_store()
        self._schedule()
        return store

    def _show_store(self) -> None:
        store = self.store()
        self.store_edit.setText("" if store is None else str(store.path))
        self.store_label.setText("no feature store: embed the slide first" if store is None
                                 else store.describe())

    def _on_session(self, event) -> None:
        session = self.explorer.sessions.get(event.value)
        if session is not None and self.stores.get(event.value) is not session.store:
            self.stores[event.value] = session.store
            if event.value == self.slide_combo.currentText():
                self._show_store()
                self._schedule()

    def _browse_store(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Feature store", "", "HDF5 (*.h5)")
        if path:
            self.set_store(path)

    def _on_slide_changed(self) -> None:
        layer = self.slide_layer()
        if layer is not None and layer.name not in self.stores:
            store = self.find_store(layer)
            if store is not None:
                self.stores[layer.name] = store
        self._show_store()

    def _update_layer_lists(self, event=None) -> None:
        for combo, kind in ((self.slide_combo, None), (self.layer_combo, "Shapes"),
                            (self.paint_combo, "Labels")):
            current = combo.currentText()
            if kind is None:
                names = [la.name for la in self.slide_layers()]
            else:
                names = [la.name for la in self.viewer.layers if type(la).__name__ == kind
                         and (kind != "Labels" or self._is_paint(la))]
            combo.blockSignals(True)
            combo.clear()
            if kind == "Labels":
                combo.addItem("")
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            elif kind == "Shapes" and names:
                combo.setCurrentText(names[-1])
            combo.blockSignals(False)
        self._on_slide_changed()
        self._connect_annotation_layers()

    @staticmethod
    def _is_paint(layer) -> bool:
        meta = layer.metadata.get("napari_gpfm", {})
        return isinstance(meta, dict) and meta.get("kind") == "class-paint"

    # ------------------------------------------------------------------ palette
    def _fill_palette(self) -> None:
        self.class_list.blockSignals(True)
        self.class_list.clear()
        for spec in self.palette:
            item = QListWidgetItem(_swatch(spec.colour), spec.name)
            self.class_list.addItem(item)
        if self.palette.active in self.palette:
            self.class_list.setCurrentRow(self.palette.index(self.palette.active))
        self.class_list.blockSignals(False)

    def _on_palette_changed(self, palette: ClassPalette) -> None:
        self._fill_palette()
        for layer in self._annotation_layers():
            if type(layer).__name__ == "Shapes":
                apply_class_colours(layer, palette)
        if self.project_dir is not None and len(palette):
            try:
                palette.save(palette_path(self.project_dir))
            except OSError as exc:
                self.status_label.setText(f"classes not saved: {exc}")
        self._schedule()

    def _on_class_row(self, row: int) -> None:
        if 0 <= row < len(self.palette):
            self.palette.set_active(self.palette.names[row])

    def add_class(self, name: str, colour=None):
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
        for layer in self._annotation_layers():
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

    # ------------------------------------------------------------------ annotation layers
    def annotation_layer(self):
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def paint_layer(self):
        name = self.paint_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _annotation_layers(self) -> list:
        return [la for la in (self.annotation_layer(), self.paint_layer()) if la is not None]

    def new_annotation_layer(self, annotations=(), name: str | None = None):
        slide_layer = self.slide_layer()
        slide = layer_slide(slide_layer) if slide_layer is not None else None
        base = slide.name if slide is not None else "slide"
        data, kwargs, _ = annotation_layer_data(
            list(annotations), self.palette, self.mpp(), name or f"{base} annotations", base)
        layer = self.viewer.add_shapes(data, **kwargs)
        self.layer_combo.setCurrentText(layer.name)
        self._connect_annotation_layers()
        return layer

    def new_paint_layer(self, cell: int = 16):
        slide_layer = self.slide_layer()
        if slide_layer is None:
            self._error("open a whole-slide image first")
            return None
        slide = layer_slide(slide_layer)
        data, kwargs, _ = paint_layer_data(slide.dimensions, self.mpp(), self.palette, cell,
                                           f"{slide.name} class paint")
        layer = self.viewer.add_labels(data, **kwargs)
        self.paint_combo.setCurrentText(layer.name)
        self._connect_annotation_layers()
        return layer

    def _connect_annotation_layers(self, *_) -> None:
        for emitter in self._connected:
            emitter.disconnect(self._on_annotations_changed)
        self._connected = []
        shapes, paint = self.annotation_layer(), self.paint_layer()
        if shapes is not None:
            apply_class_colours(shapes, self.palette)
            self._connected += [shapes.events.data, shapes.events.features]
        if paint is not None:
            self._connected += [paint.events.paint, paint.events.data]
        for emitter in self._connected:
            emitter.connect(self._on_annotations_changed)

    def _on_annotations_changed(self, event=None) -> None:
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

    def import_geojson(self, path) -> Any:
        """QuPath GeoJSON → a new Shapes layer; the file's classes and colours join the palette."""
        anns = read_geojson(path)
        for a in anns:
            if a.class_name:
                self.palette.ensure(a.class_name, a.color, overwrite_colour=True)
        return self.new_annotation_layer(anns, Path(path).name.split(".")[0])

    def export_geojson(self, path) -> str:
        layer = self.annotation_layer()
        if layer is None:
            raise ValueError("no annotation layer to export")
        return write_geojson(path, annotations_from_layer(layer, self.mpp(), self.palette))

    def _import_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "QuPath GeoJSON", "",
                                              "GeoJSON (*.geojson *.json)")
        if path:
            self._guard(self.import_geojson, path)

    def _export_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "QuPath GeoJSON", "", "GeoJSON (*.geojson)")
        if path:
            self._guard(self.export_geojson, path)

    # ------------------------------------------------------------------ training
    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _inputs(self):
        store = self.store()
        if store is None:
            raise ValueError("no feature store for this slide: embed it first")
        names = self.palette.training_names
        notes: list[str] = []
        shapes = self.annotation_layer()
        anns = [] if shapes is None else annotations_from_layer(
            shapes, self.mpp(), self.palette, notes)
        extra = None
        paint = self.paint_layer()
        if paint is not None and np.any(np.asarray(paint.data)):
            extra = labels_from_paint_layer(
                paint, self.mpp(), store.coords, store.patch_size_level0, self.palette, names,
                self.min_fraction.value())
        return store, anns, names, self.palette.colours(names), extra, notes

    def retrain(self) -> None:
        """Retrain now (in a worker); a run in progress is cancelled and restarted."""
        if self._worker is not None:
            self._rerun = True
            self._worker.quit()
            return
        try:
            store, anns, names, colours, extra, notes = self._inputs()
        except ValueError as exc:
            self.status_label.setText(str(exc))
            return
        if len(names) < 2:
            self.status_label.setText("add at least two classes to train")
            return
        self._generation += 1
        gen = self._generation
        prefix = Path(store.path).name.split(".")[0]
        worker = create_worker(
            live_steps, anns, store, names, colours, self.min_fraction.value(), extra, CV_FOLDS,
            _start_thread=False,
        )
        worker.yielded.connect(lambda u: self._on_step(u, gen, prefix, notes))
        worker.errored.connect(lambda exc: self._error(f"training failed: {exc}"))
        worker.finished.connect(self._on_worker_done)
        self._worker = worker
        self.train_button.setEnabled(False)
        worker.start()

    def _on_worker_done(self) -> None:
        self._worker = None
        self.train_button.setEnabled(True)
        if self._rerun:
            self._rerun = False
            self.retrain()

    def _on_step(self, update, generation: int, prefix: str, notes: list[str]) -> None:
        if generation != self._generation or self._rerun:
            return
        self.labels = update.labels
        if update.kind == "prediction":
            self.probe = update.probe
            for data in prediction_layer_data(update.rasters, update.probe.class_names,
                                              update.probe.colours, prefix):
                set_or_add_layer(self.viewer, data)
            self._show_labels(update.labels, notes)
        elif update.kind == "report":
            self.report = update.report
            self._show_report(update.report)
        else:
            self.status_label.setText(update.message)

    def _show_labels(self, labels, notes: list[str]) -> None:
        counts = ", ".join(f"{k} {v}" for k, v in labels.counts.items())
        parts = [f"labelled patches: {counts}"]
        if len(labels.conflicts):
            pairs = sorted({"/".join(c) for c in labels.conflict_classes})
            parts.append(f"conflicts (unlabelled): {len(labels.conflicts)} patches "
                         f"({', '.join(pairs)})")
        if labels.ignored.any():
            parts.append(f"ignored: {int(labels.ignored.sum())} patches")
        parts += list(labels.skipped) + notes
        self.status_label.setText("\n".join(parts))

    def _show_report(self, report) -> None:
        text = f"balanced accuracy (CV, {report.folds} folds): {report.balanced_accuracy:.3f}"
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

    # ------------------------------------------------------------------ classifier files
    def save_classifier(self, path) -> str | None:
        if self.probe is None:
            self._error("train a classifier first")
            return None
        return self.probe.save(path)

    def load_classifier(self, path):
        """Load a classifier for the current slide's features (refused on another recipe)."""
        try:
            probe = load_classifier(path, self.store())
        except Exception as exc:
            self._error(str(exc))
            return None
        self.probe = probe
        for i, n in enumerate(probe.class_names):
            colour = None if probe.colours is None else probe.colours[i]
            self.palette.ensure(n, colour)
        self.status_label.setText(f"loaded {Path(path).name}: classes {probe.class_names}")
        if self.store() is not None:
            self.apply_to_slide(self.slide_layer())
        return probe

    def apply_to_slide(self, slide_layer) -> bool:
        store = self.stores.get(slide_layer.name) or self.find_store(slide_layer)
        if store is None:
            self._error(f"{slide_layer.name}: no feature store; embed the slide first")
            return False
        try:
            pred = predict_store(self.probe, store)
        except Exception as exc:
            self._error(f"{slide_layer.name}: {exc}")
            return False
        self.stores[slide_layer.name] = store
        prefix = Path(store.path).name.split(".")[0]
        for data in prediction_layer_data(pred.rasters(), pred.class_names, pred.colours, prefix):
            set_or_add_layer(self.viewer, data)
        return True

    def apply_to_open_slides(self) -> int:
        """Apply the classifier to every open slide with a store; returns how many worked."""
        if self.probe is None:
            self._error("train or load a classifier first")
            return 0
        done = sum(self.apply_to_slide(layer) for layer in self.slide_layers())
        show_info(f"classifier applied to {done} slide(s)")
        return done

    def _save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save classifier", "", "Classifier (*.npz)")
        if path:
            self.save_classifier(path)

    def _load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load classifier", "", "Classifier (*.npz)")
        if path:
            self.load_classifier(path)
