"""The "Project (slide list)" dock: every slide of a study, its status, and work on all of them.

As QuPath's project: the slides of a folder (Add folder…) and every slide open in the window
are listed with a thumbnail, their pixel size and their status (embedded with which model,
annotations, classes, predicted). "Embed all" and "Apply classifier to all" run over every
listed slide, open or not, with a progress bar per slide and Cancel (the headless jobs of
:mod:`napari_gpfm.layers.project` driving ``embed_or_load`` / ``apply_job``, run by a
:class:`~._jobs.JobPanel`); a slide that fails is named and the others go on.

The project folder is the session's output folder: Save writes the session state there
(:func:`~napari_gpfm.layers.project.save_project`), Open… restores a saved project into this
window as a job (:func:`~napari_gpfm.layers.project.restore_job`: files read and classifiers
applied in the worker, each layer added in its own turn of the event loop, progress and
Cancel): slides, clusters, classes, annotation and class-paint layers, heatmaps, and the
classifiers (linear probe or PathoTune) with their predictions.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, QSize, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..layers import project as proj
from ..layers.session import session_for
from ._tiling import (
    DEVICES,
    apply_preset,
    build_tiling_controls,
    fill_model_combo,
    mark_custom,
    show_card_tiling,
    spec_of,
)
from ._jobs import JobPanel, scrolling_layout, settle_width, tap
from .reader_choice import ReaderChoicePanel, prefer_folders

__all__ = ["ProjectWidget"]

#: The table: thumbnail, name and µm/px; the models the slide is embedded with (✓: in use);
#: annotations and their classes; the classifier outputs. While "Embed all" ("Apply
#: classifier to all") runs, each row's Embedded (Predicted) cell is its progress bar; a slide
#: that failed or was cancelled says so there until the next run.
COLUMNS = ("Slide", "Embedded", "Annotations", "Predicted")
SLIDE, EMBEDDED, ANNOTATED, PREDICTED = range(len(COLUMNS))
MAX_COLUMN = 120  # px: a long model or class list is elided (the tooltip has it all)
MAX_NAME = 140  # px of slide name beside the thumbnail
BAR_WIDTH = 84
RED = "#ff6b6b"
THUMB = 44
SOURCE = "probe"  # the session's current classifier (the Annotate dock's linear probe)
NONE = "–"


def _icon(rgb: np.ndarray | None) -> QIcon:
    """A thumbnail (uint8 (h, w, 3)) as an icon, letterboxed in a THUMB square."""
    pix = QPixmap(THUMB, THUMB)
    pix.fill(Qt.GlobalColor.transparent)
    if rgb is None:
        return QIcon(pix)
    img = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    h, w = img.shape[:2]
    qimg = QImage(img.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    scaled = QPixmap.fromImage(qimg).scaled(THUMB, THUMB, Qt.AspectRatioMode.KeepAspectRatio,
                                            Qt.TransformationMode.SmoothTransformation)
    from qtpy.QtGui import QPainter

    painter = QPainter(pix)
    painter.drawPixmap((THUMB - scaled.width()) // 2, (THUMB - scaled.height()) // 2, scaled)
    painter.end()
    return QIcon(pix)


def in_ticks(steps: list) -> None:
    """Run ``steps`` (callables) one per turn of the Qt event loop, the first at once: each adds
    a layer, which costs napari a good fraction of a second on a busy machine."""
    queue = list(steps)

    def run() -> None:
        if queue:
            queue.pop(0)()
        if queue:
            QTimer.singleShot(0, run)

    run()


class _Relay(QObject):
    """Carries a job's records from its worker thread to the dock (queued signal)."""

    record = Signal(object)


class _Row:
    """One listed slide: its path (the key), name, and what a scan read."""

    def __init__(self, path: str, name: str):
        self.path = path
        self.name = name
        self.info: proj.SlideInfo | None = None
        self.mpp: float | None = None  # a saved pixel-size override for a closed slide
        self.state = ""  # "", "queued", "running", "done", "failed", "cancelled"
        self.message = ""


class ProjectWidget(QWidget):
    """Dock widget; ``napari_viewer`` is injected by napari (a proxy of the viewer)."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.rows: list[_Row] = []
        self.entries: dict[str, dict] = {}  # project.json entries by path
        self.batch_size: int | None = None
        self.num_workers: int | None = None
        self.last_steps: list[proj.SlideStep] = []
        self.last_report: proj.RestoreReport | None = None
        self._relay: _Relay | None = None
        self._scan_pending = False
        self._icons: dict[int, Any] = {}  # row -> the thumbnail its icon shows
        self._job_col: int | None = None  # the column the current (last) run's bars are in
        self._scan_todo: list[_Row] = []  # the rows the running scan reads, in its order
        self._ann_cache: dict[tuple[str, int], tuple[int, list[str]]] = {}
        self._build()
        self._connect()
        self.refresh_models()
        self._sync_rows()
        settle_width(self)

    # ================================================================== UI
    def _build(self) -> None:

        self.reader_panel = ReaderChoicePanel(self.viewer)
        self.folder_edit = QLineEdit(str(self.session.out_dir))
        self.folder_edit.setReadOnly(True)
        self.folder_edit.setToolTip("The project folder (the output folder of every dock): "
                                    "feature files, classes, annotations, classifiers and the "
                                    "session state (project.json).")  # fmt: skip
        self.open_button = QPushButton("Open…")
        self.open_button.setToolTip("Open a project folder (restores a saved project), or "
                                    "choose an empty folder for a new one.")  # fmt: skip
        self.save_button = QPushButton("Save")
        self.save_button.setToolTip("Save the session (slides, clusters, classes, annotations, "
                                    "classifier) into the project folder.")  # fmt: skip
        self.add_button = QPushButton("Add folder…")
        self.add_button.setToolTip("List every whole-slide image of a folder (they open only "
                                   "when you double-click them).")  # fmt: skip
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Take the selected closed slides off the list.")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        for c, tip in ((SLIDE, "Thumbnail, name and pixel size (italics: not open; "
                               "double-click to open)"),
                       (EMBEDDED, "Models the slide has finished feature files of in the "
                                  "project folder (✓: the one in use in this window)"),
                       (ANNOTATED, "Annotations and their classes (open slides: their Shapes "
                                   "layers; closed ones: the project's GeoJSON)"),
                       (PREDICTED, "Classifier predictions shown (open slides), or written "
                                   "to <project>/predictions ('file')")):  # fmt: skip
            self.table.horizontalHeaderItem(c).setToolTip(tip)
        self.table.setIconSize(QSize(THUMB, THUMB))
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(THUMB + 8)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.TextElideMode.ElideRight)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(False)
        header.setMinimumSectionSize(40)
        self.table.setMinimumHeight(3 * (THUMB + 8) + 30)
        self.table.setMinimumWidth(420)

        # embedding settings (the recipe "Embed all" uses); collapsed to a one-line summary
        self.settings_box = QGroupBox("Embedding settings")
        self.settings_box.setCheckable(True)
        self.settings_box.setToolTip("Untick to fold the settings away (the title keeps "
                                     "a summary).")  # fmt: skip
        self.model_combo = QComboBox()
        self.model_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_combo.setMinimumContentsLength(12)
        build_tiling_controls(self)
        self._settings_inner = QWidget()
        form = QFormLayout(self._settings_inner)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Model", self.model_combo)
        form.addRow("", self.random_check)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Target mpp", self.mpp_spin)
        form.addRow("Patch size", self.size_spin)
        form.addRow("Overlap", self.overlap_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Precision", self.precision_combo)
        sl = QHBoxLayout(self.settings_box)
        sl.addWidget(self._settings_inner)

        self.embed_button = QPushButton("Embed all")
        self.embed_button.setToolTip("Embed every listed slide (finished feature files are "
                                     "loaded, unfinished ones resumed).")  # fmt: skip
        self.apply_button = QPushButton("Apply classifier to all")
        self.apply_button.setToolTip("Classify every listed slide with the current classifier "
                                     "(Annotate & classify); outputs go to "
                                     "<project>/predictions.")  # fmt: skip
        self.scan_jobs = JobPanel("Reading slides", self.session, [])  # buttons set below
        self.scan_jobs.setVisible(False)
        self.jobs = JobPanel("Project", self.session,
                             [self.embed_button, self.apply_button, self.open_button,
                              self.add_button, self.remove_button])  # fmt: skip
        self.scan_jobs.buttons = [self.embed_button, self.apply_button]
        self.status = self.jobs.status
        self.problems = QLabel("")
        self.problems.setWordWrap(True)
        self.problems.setStyleSheet("color: #ff6b6b;")
        self.problems.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        layout = scrolling_layout(self)
        layout.addWidget(self.reader_panel)
        folder = QHBoxLayout()
        folder.addWidget(QLabel("Project"))
        folder.addWidget(self.folder_edit, 1)
        folder.addWidget(self.open_button)
        folder.addWidget(self.save_button)
        layout.addLayout(folder)
        slides = QHBoxLayout()
        slides.addWidget(self.add_button)
        slides.addWidget(self.remove_button)
        slides.addStretch(1)
        layout.addLayout(slides)
        layout.addWidget(self.summary)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.scan_jobs)
        run = QHBoxLayout()
        run.addWidget(self.embed_button)
        run.addWidget(self.apply_button)
        layout.addLayout(run)
        layout.addWidget(self.jobs)
        layout.addWidget(self.problems)
        layout.addWidget(self.settings_box)
        self.set_preset(self.preset_combo.currentText())
        self.jobs.say("Open slides or Add folder…, then Embed all. Save keeps the project.")

    def _connect(self) -> None:
        self.open_button.clicked.connect(lambda: self._open_clicked())
        self.save_button.clicked.connect(lambda: self.save())
        self.add_button.clicked.connect(lambda: self._add_clicked())
        self.remove_button.clicked.connect(lambda: self.remove_selected())
        self.embed_button.clicked.connect(lambda: self.embed_all())
        self.apply_button.clicked.connect(lambda: self.apply_all())
        self.table.cellDoubleClicked.connect(lambda r, _c: self.open_row(r))
        self.settings_box.toggled.connect(self._fold_settings)
        self.preset_combo.currentTextChanged.connect(self.set_preset)
        for spin in (self.mpp_spin, self.size_spin, self.overlap_spin):
            spin.valueChanged.connect(self._spec_edited)
        for w in (self.preset_combo, self.model_combo, self.device_combo, self.precision_combo):
            w.currentIndexChanged.connect(lambda _: self._settings_title())
        self.model_combo.currentIndexChanged.connect(lambda _: self._model_changed())
        self.random_check.toggled.connect(lambda _: self.refresh_models())
        self.jobs.finished.connect(self._job_finished)
        self.scan_jobs.finished.connect(self._scan_finished)

        layers = self.session.viewer.layers
        ev = self.session.events
        hooks = [(layers.events.inserted, self._on_layers),
                 (layers.events.removed, self._on_layers),
                 (ev.slides, self._on_layers), (ev.store, self._refresh),
                 (ev.clusters, self._refresh), (ev.prediction, self._refresh),
                 (ev.classifier, self._refresh), (ev.out_dir, self._on_out_dir)]  # fmt: skip
        models = getattr(ev, "models", None)  # a new model card (a finetuned student)
        if models is not None:
            hooks.append((models, lambda e=None: self.refresh_models()))
        for emitter, cb in hooks:
            emitter.connect(cb)
        self.session.palette.connect(self._on_palette)
        palette = self.session.palette

        def teardown(*_: Any, hooks=hooks, palette=palette, cb=self._on_palette) -> None:
            for emitter, slot in hooks:
                try:
                    emitter.disconnect(slot)
                except (RuntimeError, TypeError, ValueError):
                    pass
            palette.disconnect(cb)

        self.destroyed.connect(teardown)

    # ================================================================== settings
    def _fold_settings(self, unfolded: bool) -> None:
        self._settings_inner.setVisible(unfolded)
        self._settings_title()

    def _settings_title(self) -> None:
        """The box's title says what Embed all will use, folded or not."""
        spec = self.spec()
        model = self.model_combo.currentData() or "no model"
        self.settings_box.setTitle(f"Embedding settings: {model}, {spec.patch_size} px at "
                                   f"{spec.target_mpp:g} µm/px")  # fmt: skip

    def _model_changed(self) -> None:
        """Another model: show its card's recommended tiling (GPFM: its authors' 128 µm field),
        as the GPFM dock does; the user may then change it."""
        from ..encoders import get_card

        name = self.model_combo.currentData()
        if name:
            show_card_tiling(self, get_card(name))
            self._settings_title()

    def refresh_models(self) -> None:
        if fill_model_combo(self.model_combo):  # first fill, or the model went away
            self._model_changed()

    def set_preset(self, name: str) -> None:
        apply_preset(self, name)
        self._settings_title()

    def _spec_edited(self, *_: Any) -> None:
        mark_custom(self)
        self._settings_title()

    def spec(self) -> Any:
        return spec_of(self)

    def settings(self) -> dict:
        """The embedding settings as plain data (saved with the project)."""
        return {"model": self.model_combo.currentData(),
                "allow_random": self.random_check.isChecked(),
                "preset": self.preset_combo.currentText(), "target_mpp": self.mpp_spin.value(),
                "patch_size": self.size_spin.value(), "overlap": self.overlap_spin.value(),
                "device": self.device_combo.currentText(),
                "precision": self.precision_combo.currentText()}  # fmt: skip

    def apply_settings(self, s: dict) -> None:
        if not s:
            return
        if "allow_random" in s:
            self.random_check.setChecked(bool(s["allow_random"]))
        self.refresh_models()
        i = self.model_combo.findData(s.get("model"))
        if i >= 0:
            self.model_combo.setCurrentIndex(i)
        if s.get("preset") in [self.preset_combo.itemText(k)
                               for k in range(self.preset_combo.count())]:  # fmt: skip
            self.preset_combo.setCurrentText(s["preset"])
        for spin, key in ((self.mpp_spin, "target_mpp"), (self.size_spin, "patch_size"),
                          (self.overlap_spin, "overlap")):  # fmt: skip
            if key in s:
                spin.blockSignals(True)
                spin.setValue(s[key])
                spin.blockSignals(False)
        if s.get("device") in DEVICES:
            self.device_combo.setCurrentText(s["device"])
        if self.precision_combo.findText(str(s.get("precision"))) >= 0:
            self.precision_combo.setCurrentText(s["precision"])

    # ================================================================== the list
    def _open_states(self) -> dict[str, Any]:
        """Open slides by path."""
        return {proj.same_path(s.slide.path): s for s in self.session.slides.values()}

    def row_of(self, path_or_name: str) -> int:
        """The row of a slide (path or name); -1 when not listed."""
        key = proj.same_path(path_or_name) if os.sep in str(path_or_name) else None
        for i, r in enumerate(self.rows):
            if r.path == key or r.name == path_or_name:
                return i
        return -1

    def add_paths(self, paths: list[str | os.PathLike]) -> int:
        """List these slides (kept once); returns how many were new."""
        known = {r.path for r in self.rows}
        new = 0
        for p in paths:
            key = proj.same_path(p)
            if key not in known:
                known.add(key)
                self.rows.append(_Row(key, Path(key).stem if Path(key).is_file()
                                      else Path(key).name))  # fmt: skip
                new += 1
        if new:
            prefer_folders(paths)
            self._sync_rows()
        return new

    def add_folder(self, folder: str | os.PathLike) -> int:
        """List every whole-slide image of ``folder``."""
        try:
            paths = proj.find_slides(folder)
        except OSError as exc:
            self._error(str(exc))
            return 0
        if not paths:
            self.jobs.say(f"No whole-slide images in {folder}.", error=True)
            return 0
        new = self.add_paths(paths)
        self.jobs.say(f"{len(paths)} slide(s) in {folder} ({new} new to the list).")
        return new

    def remove_selected(self) -> None:
        open_paths = self._open_states()
        rows = sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True)
        kept = 0
        for r in rows:
            if self.rows[r].path in open_paths:
                kept += 1
                continue
            del self.rows[r]
            self.table.removeRow(r)
        self._icons.clear()
        self._sync_rows()
        if kept:
            self.jobs.say(f"{kept} open slide(s) stay listed: close their layers first.")

    def _on_layers(self, event: Any = None) -> None:
        self._sync_rows()

    def _sync_rows(self) -> None:
        """Open slides join the list; rows without information get scanned; table redrawn."""
        known = {r.path for r in self.rows}
        for path, s in self._open_states().items():
            if path not in known:
                self.rows.append(_Row(path, s.name))
                known.add(path)
        self._refresh()
        self.scan()

    def scan(self) -> Any:
        """Read thumbnail, mpp and stores of the rows not read yet (in the background)."""
        todo = [r for r in self.rows if r.info is None]
        if not todo:
            return None
        if self.scan_jobs.busy or self.jobs.busy:
            self._scan_pending = True
            return None
        states = self._open_states()
        items = [(r.path, getattr(states.get(r.path), "slide", None), r.mpp) for r in todo]
        for r in todo:
            r.info = proj.SlideInfo(r.path, r.name)  # placeholder: not queued twice
        self._scan_todo = todo
        relay = _Relay()
        relay.record.connect(self._on_scanned)  # a bound slot: dropped if the dock goes
        self._scan_relay = relay
        self.scan_jobs.setVisible(True)
        return self.scan_jobs.run(
            tap(proj.scan_job(items, self.session.out_dir), relay.record.emit),
            message=f"Reading {len(items)} slide(s)…")  # fmt: skip

    def _on_scanned(self, p: Any) -> None:
        step = p.data
        if not isinstance(step, proj.SlideStep) or not step.finished:
            return
        row = self._scan_todo[step.row]
        row.info = step.result
        row.name = step.result.name if row.path not in self._open_states() else row.name
        self._refresh()

    def _scan_finished(self, outcome: str) -> None:
        self.scan_jobs.setVisible(False)
        if outcome != "done":  # rows left unread are read next time
            for r in self.rows:
                if r.info is not None and r.info.dimensions is None and r.info.problem is None:
                    r.info = None
        if self._scan_pending:
            self._scan_pending = False
            self.scan()

    def _refresh(self, event: Any = None) -> None:
        """Redraw every row's status from the session (open slides) and the project folder."""
        states = self._open_states()
        self.table.setRowCount(len(self.rows))
        for i, r in enumerate(self.rows):
            s = states.get(r.path)
            cells = self._status(r, s)
            for c, text in enumerate(cells):
                item = self.table.item(i, c)
                if item is None:
                    item = QTableWidgetItem()
                    self.table.setItem(i, c, item)
                item.setText(text)
                item.setToolTip(text)
                item.setData(Qt.ItemDataRole.ForegroundRole, None)
            if r.state in ("failed", "cancelled") and self._job_col is not None:
                item = self.table.item(i, self._job_col)
                item.setText(r.state)
                item.setToolTip(r.message)
                if r.state == "failed":
                    item.setForeground(QColor(RED))
            name_item = self.table.item(i, SLIDE)
            name_item.setToolTip(r.path + ("" if s is not None else "\n(closed: double-click "
                                                                     "to open)"))  # fmt: skip
            thumb = None if r.info is None else r.info.thumbnail
            if self._icons.get(i) is not thumb:
                name_item.setIcon(_icon(thumb))
                self._icons[i] = thumb
            font = name_item.font()
            font.setItalic(s is None)
            name_item.setFont(font)
            if r.info is not None and r.info.problem:
                name_item.setToolTip(f"{r.path}\n{r.info.problem}")
        self._fit_columns()
        self._summary()

    def _fit_columns(self) -> None:
        """Columns as wide as their content, at most MAX_COLUMN (elided beyond; the slide's
        name MAX_NAME beside its thumbnail); a column of progress bars at least BAR_WIDTH."""
        fm = self.table.fontMetrics()
        bars = self._job_col is not None and any(r.state in ("queued", "running")
                                                 for r in self.rows)  # fmt: skip
        for c in range(len(COLUMNS)):
            texts = [COLUMNS[c]] + [
                line for i in range(self.table.rowCount())
                for line in (self.table.item(i, c).text() if self.table.item(i, c) else ""
                             ).split("\n")
            ]  # fmt: skip
            width = max(fm.horizontalAdvance(t) for t in texts) + 16
            if c == SLIDE:
                width = min(width, MAX_NAME) + THUMB + 8
            else:
                width = min(width, MAX_COLUMN)
            if bars and c == self._job_col:
                width = max(width, BAR_WIDTH)
            self.table.setColumnWidth(c, max(width, 40))

    def _status(self, r: _Row, s: Any) -> list[str]:
        info = r.info
        name = s.name if s is not None else r.name
        mpp = s.mpp if s is not None else (info.mpp if info is not None else None)
        models = list(info.models) if info is not None else []
        if s is not None and s.model and s.store is not None:
            models = [f"{s.model} ✓"] + [m for m in models if m != s.model]
        n_ann, classes = self._annotations(r, s)
        if s is not None and s.predictions:
            predicted = ", ".join(sorted(s.predictions))
        elif proj.predicted_file(self.session.out_dir, name).is_file():
            predicted = "file"  # written by Apply classifier to all (slide closed)
        else:
            predicted = NONE
        if info is not None and info.problem:
            return [f"{name}\ncannot read", NONE, NONE, NONE]
        if mpp:
            mpp_text = f"{mpp:.3f} µm/px"
        elif info is None or info.dimensions is None:
            mpp_text = "reading…"
        else:
            mpp_text = "µm/px unknown"
        annotated = f"{n_ann}\n{', '.join(classes)}" if n_ann else NONE
        return [f"{name}\n{mpp_text}", "\n".join(models) or NONE, annotated, predicted]

    def _annotations(self, r: _Row, s: Any) -> tuple[int, list[str]]:
        """(annotations, classes): from the open slide's Shapes layers, else from the project's
        saved GeoJSON."""
        if s is not None:
            n, classes = 0, set()
            for la in proj.annotation_layers(self.session, s.uid):
                n += len(la.data)
                if "class" in getattr(la.features, "columns", ()):
                    classes |= {str(c) for c in la.features["class"] if c and c == c}
            return n, sorted(classes)
        e = self.entries.get(r.path)
        rel = e.get("annotations") if e else None
        path = (Path(rel) if rel and os.path.isabs(rel) else self.session.out_dir / rel) \
            if rel else None  # fmt: skip
        if path is None or not path.is_file():
            return 0, []
        key = (str(path), path.stat().st_mtime_ns)
        if key not in self._ann_cache:  # read once per file version
            self._ann_cache[key] = proj.annotation_summary(path)
        return self._ann_cache[key]

    def progress_bar(self, row: int) -> QProgressBar | None:
        """The progress bar of a row while a run goes (``None`` when it shows no bar)."""
        if self._job_col is None:
            return None
        cell = self.table.cellWidget(row, self._job_col)
        return None if cell is None else cell.findChild(QProgressBar)

    def _bar(self, i: int) -> QProgressBar:
        """Row ``i``'s progress bar in the run's column (made when missing)."""
        bar = self.progress_bar(i)
        if bar is None:
            cell = QWidget()
            cell.setAutoFillBackground(True)  # hides the cell's text under the bar
            lay = QVBoxLayout(cell)
            lay.setContentsMargins(4, 2, 4, 2)
            bar = QProgressBar()
            bar.setMaximumHeight(22)
            bar.setTextVisible(True)
            bar.setRange(0, 1)
            bar.setValue(0)
            bar.setFormat("queued")
            lay.addWidget(bar, 0, Qt.AlignmentFlag.AlignVCenter)
            self.table.setCellWidget(i, self._job_col, cell)
        return bar

    def _drop_bar(self, i: int) -> None:
        if self._job_col is not None and self.table.cellWidget(i, self._job_col) is not None:
            self.table.removeCellWidget(i, self._job_col)

    def _summary(self) -> None:
        n_open = len(self._open_states())
        parts = [f"{len(self.rows)} slide(s), {n_open} open"]
        if len(self.session.palette):
            parts.append("classes: " + ", ".join(self.session.palette.names))
        clf = self.session.classifiers.get(SOURCE)
        if clf is not None:
            parts.append(f"classifier: {len(clf.class_names)} classes")
        saved = proj.is_project(self.session.out_dir)
        parts.append("saved" if saved else "not saved yet")
        self.summary.setText(" · ".join(parts))

    def open_row(self, row: int) -> Any:
        """Open a closed slide of the list with napari-gpfm's reader."""
        if not 0 <= row < len(self.rows):
            return None
        r = self.rows[row]
        if r.path in self._open_states():
            return None
        try:
            layers = self.session.viewer.open(r.path, plugin=proj.PLUGIN)
        except Exception as exc:  # noqa: BLE001 - shown; the list stays
            self._error(f"{r.name}: {exc}")
            return None
        if r.mpp and layers:
            from ..layers.reader import set_layer_mpp

            set_layer_mpp(layers[0], r.mpp)
        return layers

    # ================================================================== project folder
    def _on_out_dir(self, event: Any = None) -> None:
        self.folder_edit.setText(str(self.session.out_dir))
        for r in self.rows:  # stores are looked up in the new folder
            if r.info is not None and r.info.problem is None:
                r.info = None
        self._sync_rows()

    def _on_palette(self, palette: Any) -> None:
        self._summary()

    def _open_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Project folder",
                                                  str(self.session.out_dir))  # fmt: skip
        if folder:
            self.open_project(folder)

    def open_project(self, folder: str | os.PathLike) -> Any:
        """Restore the project saved in ``folder`` into this window, or start a new project
        there (an empty folder, or a folder of slides: they are listed)."""
        folder = Path(folder).expanduser()
        self.problems.setText("")
        if not proj.is_project(folder):
            self.session.set_out_dir(folder)
            self.entries = {}
            slides = proj.find_slides(folder) if folder.is_dir() else []
            if slides:
                self.add_paths(slides)
            self.jobs.say(f"New project in {folder}" + (f" with its {len(slides)} slide(s)"
                                                         if slides else "")
                          + ". Save keeps it.")  # fmt: skip
            return None
        try:
            data = proj.load_project(folder)
        except proj.ProjectError as exc:
            self._error(str(exc))
            return None
        self.entries = {proj.same_path(e["path"]): e for e in data.get("slides", [])
                        if isinstance(e, dict) and e.get("path")}  # fmt: skip
        relay = _Relay()
        relay.record.connect(self._on_restore_record)
        self._restore_relay = relay
        self._kind = "restore"
        return self.jobs.run(tap(proj.restore_job(self.session, folder), relay.record.emit),
                             on_result=self._restored,
                             message=f"Opening the project {folder}…")  # fmt: skip

    def _on_restore_record(self, p: Any) -> None:
        """A restore's main-thread step (one layer at most), in its own event-loop turn."""
        if isinstance(p.data, proj.RestoreStep):
            p.data.run()

    def _restored(self, report: proj.RestoreReport) -> None:
        self.last_report = report
        self.apply_settings(report.settings)
        self.add_paths(report.slides)
        for r in self.rows:
            e = self.entries.get(r.path)
            if e and e.get("mpp"):
                r.mpp = float(e["mpp"])
        self._refresh()
        self.jobs.say(report.summary(), error=bool(report.problems))
        if report.problems:
            self.problems.setText("\n".join(report.problems))

    def save(self) -> Path | None:
        """Save the session into the project folder (project.json and its files)."""
        try:
            path = proj.save_project(self.session, [r.path for r in self.rows],
                                     self.settings())  # fmt: skip
        except (OSError, ValueError) as exc:
            self._error(f"Project not saved: {exc}")
            return None
        try:
            data = proj.load_project(path.parent)
            self.entries = {proj.same_path(e["path"]): e for e in data.get("slides", [])}
        except proj.ProjectError:
            pass
        self._refresh()
        self.jobs.say(f"Project saved: {path}")
        return path

    def _add_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of slides",
                                                  str(self.session.out_dir))  # fmt: skip
        if folder:
            self.add_folder(folder)

    # ================================================================== jobs
    def _error(self, message: str) -> None:
        self.jobs.say(message, error=True)
        show_error(message)

    def _start(self, job: Generator, column: int, message: str) -> Any:
        """Run a many-slide job, each row's bar in ``column``."""
        for i in range(len(self.rows)):
            self._drop_bar(i)
        self._job_col = column
        for i, r in enumerate(self.rows):
            r.state, r.message = "queued", ""
            self._bar(i)
        self._refresh()
        self.problems.setText("")
        relay = _Relay()
        relay.record.connect(self._on_record)
        self._relay = relay
        return self.jobs.run(tap(job, relay.record.emit), on_result=self._on_result,
                             message=message)  # fmt: skip

    def embed_all(self) -> Any:
        """Embed (or load) every listed slide with the settings above, one after the other."""
        from ..encoders import get_card
        from ..jobs.embed import EmbedRequest
        from ..tiles import TissueParams

        if self.jobs.busy:
            return self.jobs.worker
        if not self.rows:
            self._error("No slides: open slides or Add folder… first.")
            return None
        model = self.model_combo.currentData()
        if model is None:
            self._error("No model cards found in the registry.")
            return None
        card = get_card(model)
        if not card.status().found and not self.random_check.isChecked():
            self._error(card.missing_weights_message())
            return None
        template = EmbedRequest(
            slide=None, model=model, spec=self.spec(), tissue_params=TissueParams(),
            out_dir=self.session.out_dir, device=self.device_combo.currentText(),
            precision=self.precision_combo.currentText(),
            allow_random=self.random_check.isChecked(), batch_size=self.batch_size,
            num_workers=self.num_workers,
        )  # fmt: skip
        states = self._open_states()
        items = []
        for r in self.rows:
            s = states.get(r.path)
            items.append(proj.EmbedItem(s.uid if s is not None else r.path,
                                        s.name if s is not None else r.name, r.path,
                                        s.slide if s is not None else None, r.mpp))  # fmt: skip
        self._kind = "embed"
        return self._start(proj.embed_all_job(items, template), EMBEDDED,
                           f"Embedding {len(items)} slide(s) with {model}…")  # fmt: skip

    def apply_all(self) -> Any:
        """Classify every listed slide with the current classifier."""
        if self.jobs.busy:
            return self.jobs.worker
        clf = self.session.classifiers.get(SOURCE)
        if clf is None:
            self._error("No classifier yet: train or load one in the Annotate & classify dock "
                        "(or open a project that has one).")  # fmt: skip
            return None
        if not self.rows:
            self._error("No slides: open slides or Add folder… first.")
            return None
        states = self._open_states()
        items = []
        for r in self.rows:
            s = states.get(r.path)
            store = None
            if s is not None:
                try:
                    store = self.session.find_store(s.uid)
                except Exception:  # noqa: BLE001 - the job names the slide's problem
                    store = None
            items.append(proj.ApplyItem(s.uid if s is not None else r.path,
                                        s.name if s is not None else r.name, r.path, store,
                                        r.mpp))  # fmt: skip
        self._kind = "apply"
        return self._start(proj.apply_all_job(clf, items, self.session.out_dir, SOURCE),
                           PREDICTED, f"Classifying {len(items)} slide(s)…")  # fmt: skip

    def _on_record(self, p: Any) -> None:
        step = p.data
        if not isinstance(step, proj.SlideStep) or not 0 <= step.row < len(self.rows):
            return
        r = self.rows[step.row]
        if step.progress is not None and not step.finished:
            bar = self._bar(step.row)
            inner = step.progress
            r.state, r.message = "running", inner.message
            if inner.total > 0:
                bar.setRange(0, int(inner.total))
                bar.setValue(int(inner.done))
                bar.setFormat("%p%")  # the tooltip has "done / total unit"
            else:
                bar.setRange(0, 0)  # busy
            bar.setToolTip(f"{inner.message} ({inner.done:,} / {inner.total:,} {inner.unit})"
                           if inner.total > 0 else inner.message)  # fmt: skip
            return
        if not step.finished:
            return
        if step.error is not None:
            r.state, r.message = "failed", step.error
        else:
            r.state, r.message = "done", p.message
            self._use_result(step)
        self._drop_bar(step.row)
        self._refresh()

    def _use_result(self, step: proj.SlideStep) -> None:
        """An open slide's result goes into the session (store attached, class map painted);
        a closed slide's store joins its row."""
        r = self.rows[step.row]
        s = self._open_states().get(r.path)
        result = step.result
        if getattr(self, "_kind", "") == "embed":
            store = result.store
            if s is not None:
                same = s.store is not None and Path(s.store.path) == Path(store.path)
                if not same:
                    self.session.attach_store(s.uid, store, result.index)
                    self.session.hide_preview(s.uid)
            if r.info is not None and all(st.path != str(store.path) for st in r.info.stores):
                r.info.stores.insert(0, proj.StoreInfo(str(store.path), str(store.model),
                                                       int(store.n_patches),
                                                       Path(store.path).parent.parent.name))
        elif result is not None and result.prediction is not None and s is not None:
            pred = result.prediction
            in_ticks(self.session.prediction_steps(s.uid, SOURCE, pred.rasters(),
                                                   pred.class_names, pred.colours))  # fmt: skip

    def _on_result(self, steps: list) -> None:
        self.last_steps = steps
        failed = [s for s in steps if s.error is not None]
        done = len(steps) - len(failed)
        verb = "embedded or loaded" if getattr(self, "_kind", "") == "embed" else "classified"
        text = f"{done} of {len(steps)} slide(s) {verb}."
        if failed:
            text += f" {len(failed)} failed (below)."
            self.problems.setText("\n".join(f"{s.name}: {s.error}" for s in failed))
        self.jobs.say(text, error=bool(failed))
        show_info(text)

    def _job_finished(self, outcome: str) -> None:
        left = False
        for i, r in enumerate(self.rows):
            if r.state in ("queued", "running"):
                r.state = "failed" if outcome == "error" else "cancelled"
                r.message = self.status.text()
                left = True
            self._drop_bar(i)
        if left:
            self._refresh()
        if self._scan_pending:
            self._scan_pending = False
            self.scan()
