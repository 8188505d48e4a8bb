"""The "GPFM" dock: embed a slide, then clusters, heatmaps, similarity search and export.

Thin over the window's :class:`~napari_gpfm.layers.session.ViewerSession` (shared with every
other dock) and the jobs of :mod:`napari_gpfm.jobs`: inputs are gathered here, long work runs
through a :class:`~._jobs.JobPanel`, results go into the session, which builds every layer.
Features are written to ``<output folder>/<tiling>/features_<model>/<slide>.h5``; the output
folder is the session's (default ``~/.cache/napari-gpfm/features``).

What is on screen is explained here too: the cluster table is the clusters' legend (colour and
name, as the Labels layer's ``features``) with a gallery of the patches nearest each centre; the
heatmap section names the shown heatmap and its value range beside napari's colour bar; similarity
hits are a gallery of thumbnails with score and slide (a click centres the viewer on the patch).
A first query whose slides have no similarity index yet builds it in a job (features are read
and normalised off the main thread), with a message, before the maps are drawn.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..jobs.progress import Progress
from ..layers import convert
from ..layers.gallery import exemplar_tiles, hit_tiles
from ..layers.session import HEATMAP_LABELS, session_for
from ._jobs import JobPanel, fit_width, settle_width, wrap_in_scroll
from ._tiling import (
    apply_preset,
    build_tiling_controls,
    fill_model_combo,
    mark_custom,
    show_card_tiling,
    spec_of,
)
from .gallery import ColourBarLegend, TileGallery, centre_on_patch

TISSUE_CHOICES = (("Auto", "auto"), ("Whole image", "none"), ("Otsu (older stores)", "otsu"))
COLORMAPS = ("viridis", "inferno", "magma", "plasma", "turbo", "gray")
MISSING_MPP = (
    "{name}: the slide does not record its pixel size (µm/px), so patches cannot be cut at an "
    "exact magnification. Set it in the 'Slide info' panel (Plugins > napari-gpfm > Slide "
    "info), then compute again."
)


def _detacher(viewer, drag_cb, move_cb):
    """A slot removing the dock's mouse callbacks from the viewer once the dock is deleted
    (a closure: the widget itself is gone by then)."""

    def detach(*_):
        for callbacks, cb in ((viewer.mouse_drag_callbacks, drag_cb),
                              (viewer.mouse_move_callbacks, move_cb)):  # fmt: skip
            if cb in callbacks:
                callbacks.remove(cb)

    return detach


def index_job(states: Sequence[Any]) -> Generator[Progress, None, int]:
    """Build the similarity index of each slide state (read and L2-normalise its features),
    off the main thread; returns how many were built."""
    states = list(states)
    total = sum(s.n for s in states)
    done = 0
    for i, s in enumerate(states):
        yield Progress("similarity", "indexing", done, total, status="started" if i == 0
                       else "running", unit="patches",
                       message=f"Similarity: reading and indexing the {s.n:,} patch features of "
                               f"{s.name} ({i + 1}/{len(states)})…")  # fmt: skip
        s.index  # noqa: B018 - builds and caches the index
        done += s.n
    yield Progress("similarity", "indexing", total, total, status="done", unit="patches",
                   message="Similarity: index ready; drawing the maps…")
    return len(states)


def fill_slide_combo(combo: QComboBox, session: Any, only_embedded: bool = False) -> None:
    """Slide layers of the session in ``combo`` (text: layer name, data: uid), keeping the
    current choice when it is still there."""
    current = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    for s in session.slides.values():
        if not only_embedded or s.has_store:
            combo.addItem(s.name, s.uid)
    i = combo.findData(current)
    if i >= 0:
        combo.setCurrentIndex(i)
    combo.blockSignals(False)


def _swatch(rgba, size: int = 12) -> QIcon:
    pm = QPixmap(size, size)
    pm.fill(QColor.fromRgbF(*(float(v) for v in list(rgba)[:3])))
    return QIcon(pm)


class GPFMWidget(QWidget):
    """Dock widget; ``napari_viewer`` is injected by napari (a proxy of the viewer)."""

    def __init__(self, napari_viewer, allow_random: bool = False):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.last_result: Any = None
        self.batch_size: int | None = None
        self.num_workers: int | None = None
        self._hovering: tuple[int, int] | None = None
        self._build(allow_random)
        self._connect()
        self._update_layers()
        self.refresh_models()
        self.viewer.mouse_drag_callbacks.append(self._on_mouse_drag)
        self.viewer.mouse_move_callbacks.append(self._on_mouse_move)
        self.destroyed.connect(_detacher(self.viewer, self._on_mouse_drag, self._on_mouse_move))
        settle_width(self)

    @property
    def run_finished(self):
        """Signal(str) emitted when an embed job ends: "done", "cancelled" or "error"."""
        return self.jobs.finished

    @property
    def hits_table(self) -> TileGallery:
        """The similarity hits (now a gallery; ``rowCount()`` still counts them)."""
        return self.hits_gallery

    # ================================================================== construction
    def _build(self, allow_random: bool) -> None:

        self.layer_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.setToolTip(
            "Models of the registry (models/*.yaml and your models folder). Non-GPFM models "
            "are flagged '(not GPFM)'."
        )
        build_tiling_controls(self)
        self.random_check.setChecked(allow_random)
        self.out_edit = QLineEdit(str(self.session.out_dir))
        self.out_edit.setToolTip("Feature files go to <folder>/<tiling>/features_<model>/"
                                 "<slide>.h5. "
                                 "Default: ~/.cache/napari-gpfm/features (writable even when "
                                 "slides are on read-only shares).")  # fmt: skip
        self.out_button = QPushButton("…")
        self.out_button.setFixedWidth(28)
        self.preview_button = QPushButton("Preview tissue")
        self.compute_button = QPushButton("Compute embeddings")
        self.jobs = JobPanel("GPFM", self.session, [self.preview_button, self.compute_button])
        self.jobs.say("Open a slide, pick a model, then Preview tissue or Compute.")
        self.cancel_button = self.jobs.cancel_button
        self.progress = self.jobs.bar
        self.status = self.jobs.status
        self.cluster_jobs = JobPanel("Clusters", self.session, [])

        self.tissue_combo = QComboBox()
        for label, method in TISSUE_CHOICES:
            self.tissue_combo.addItem(label, method)
        self.tissue_combo.setToolTip(
            "Auto finds tissue on whole slides, crops and TMAs; Whole image embeds every patch "
            "(ROIs and crops that are all tissue); Otsu reproduces stores made before 0.2.")
        embed_box = QGroupBox("Embeddings")
        form = QFormLayout(embed_box)
        form.addRow("Slide layer", self.layer_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("", self.random_check)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Target mpp", self.mpp_spin)
        form.addRow("Patch size", self.size_spin)
        form.addRow("Overlap", self.overlap_spin)
        form.addRow("Tissue", self.tissue_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Precision", self.precision_combo)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit)
        out_row.addWidget(self.out_button)
        form.addRow("Output folder", out_row)
        buttons = QHBoxLayout()
        for b in (self.preview_button, self.compute_button):
            buttons.addWidget(b)
        form.addRow(buttons)
        form.addRow(self.jobs)

        # clusters
        self.k_spin = QSpinBox()
        self.k_spin.setRange(2, 50)
        self.k_spin.setValue(4)
        self.cluster_button = QPushButton("Cluster (k-means)")
        self.cluster_table = QTableWidget(0, 4)
        self.cluster_table.setHorizontalHeaderLabels(["cluster", "patches", "%", "area (mm²)"])
        header = self.cluster_table.horizontalHeader()
        for c in range(3):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.cluster_table.verticalHeader().setVisible(False)
        self.cluster_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.cluster_table.setMaximumHeight(180)
        self.cluster_table.setToolTip("The clusters' legend: colour and name as on the slide's "
                                      "cluster map (its layer's features table).")
        self.exemplars_label = QLabel("Exemplars: the patches nearest each cluster's centre "
                                      "(click one to go there)")  # fmt: skip
        self.exemplars_label.setWordWrap(True)
        self.exemplars = TileGallery(self.session, size=72, rows=2)
        self._exemplars_of: tuple | None = None
        cl_box = self.cluster_box = QGroupBox("Clusters")
        cl = QVBoxLayout(cl_box)
        row = QHBoxLayout()
        row.addWidget(QLabel("k"))
        row.addWidget(self.k_spin)
        row.addWidget(self.cluster_button)
        cl.addLayout(row)
        cl.addWidget(self.cluster_jobs)
        cl.addWidget(self.cluster_table)
        cl.addWidget(self.exemplars_label)
        cl.addWidget(self.exemplars)

        # heatmaps
        self.value_combo = QComboBox()
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(COLORMAPS)
        self.opacity_spin = QDoubleSpinBox()
        self.opacity_spin.setRange(0.0, 1.0)
        self.opacity_spin.setSingleStep(0.05)
        self.opacity_spin.setValue(0.6)
        self.heatmap_button = QPushButton("Show heatmap")
        self.legend = ColourBarLegend()
        hm_box = QGroupBox("Heatmap")
        hm = QFormLayout(hm_box)
        hm.addRow("Value", self.value_combo)
        hm.addRow("Colormap", self.cmap_combo)
        hm.addRow("Opacity", self.opacity_spin)
        hm.addRow(self.heatmap_button)
        hm.addRow(self.legend)

        # similarity
        self.click_check = QCheckBox("Click on the slide to query (Alt-drag still pans)")
        self.click_check.setChecked(True)
        self.points_combo = QComboBox()
        self.points_button = QPushButton("Query points layer")
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(1, 500)
        self.topk_spin.setValue(10)
        self.hits_gallery = TileGallery(self.session, rows=2)
        self.hits_gallery.setToolTip("Most similar patches, best first: cosine similarity and "
                                     "slide. Click one to centre the viewer on it.")
        self.sim_jobs = JobPanel("Similarity", self.session, [])
        self.sim_jobs.say("Click a patch on an embedded slide (or use a Points layer).")
        self._sim_bar(False)
        self._pending_query: tuple[int, np.ndarray] | None = None
        self._query_result: Any = None
        sim_box = QGroupBox("Similarity search")
        sim = QFormLayout(sim_box)
        sim.addRow(self.click_check)
        prow = QHBoxLayout()
        prow.addWidget(self.points_combo)
        prow.addWidget(self.points_button)
        sim.addRow("Points", prow)
        sim.addRow("Top k", self.topk_spin)
        sim.addRow(self.sim_jobs)
        sim.addRow(self.hits_gallery)

        # export
        self.export_buttons = {
            "png": QPushButton("PNG overlays"),
            "table": QPushButton("Patch table"),
            "geojson": QPushButton("QuPath GeoJSON"),
        }
        ex_box = QGroupBox("Export (asks where; full-resolution maps and per-patch tables)")
        ex = QHBoxLayout(ex_box)
        for b in self.export_buttons.values():
            ex.addWidget(b)

        inner = QWidget()
        lay = QVBoxLayout(inner)
        from .reader_choice import reader_choice_panel

        lay.addWidget(reader_choice_panel(self.viewer))
        for box in (embed_box, cl_box, hm_box, sim_box, ex_box):
            lay.addWidget(box)
        lay.addStretch(1)
        fit_width(self, wrap_in_scroll(self, inner))
        self.cluster_jobs.buttons = [self.cluster_button]
        for combo in (self.layer_combo, self.model_combo, self.points_combo, self.value_combo):
            combo.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
            )
            combo.setMinimumContentsLength(12)
        self.set_preset(self.preset_combo.currentText())

    def _connect(self) -> None:
        self.preset_combo.currentTextChanged.connect(self.set_preset)
        self.preset_combo.currentTextChanged.connect(self._recipe_changed)
        for spin in (self.mpp_spin, self.size_spin, self.overlap_spin):
            spin.valueChanged.connect(self._spec_edited)
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        self.tissue_combo.currentIndexChanged.connect(self._recipe_changed)
        self.precision_combo.currentIndexChanged.connect(self._recipe_changed)
        self.random_check.toggled.connect(lambda _: self.refresh_models())
        self.out_button.clicked.connect(self._choose_out)
        self.out_edit.editingFinished.connect(
            lambda: self.session.set_out_dir(self.out_edit.text()))
        self.preview_button.clicked.connect(lambda: self.preview_tissue())
        self.compute_button.clicked.connect(lambda: self.compute())
        self.jobs.finished.connect(self._after_job)
        self.cluster_button.clicked.connect(lambda: self.cluster())
        self.heatmap_button.clicked.connect(lambda: self.show_heatmap())
        self.points_button.clicked.connect(lambda: self.query_points(wait=False))
        self.hits_gallery.tile_clicked.connect(self.go_to_patch)
        self.exemplars.tile_clicked.connect(self.go_to_patch)
        self.sim_jobs.finished.connect(self._after_indexing)
        for what, b in self.export_buttons.items():
            b.clicked.connect(lambda _=False, w=what: self.export((w,)))
        self.layer_combo.currentIndexChanged.connect(lambda _: self._refresh_results())
        self.viewer.layers.events.inserted.connect(self._update_layers)
        self.viewer.layers.events.removed.connect(self._update_layers)
        ev = self.session.events
        ev.slides.connect(self._update_layers)
        ev.store.connect(self._refresh_results)
        ev.clusters.connect(self._refresh_results)
        ev.similarity.connect(self._refresh_values)
        ev.similarity.connect(self._show_hits)
        ev.out_dir.connect(self._out_dir_changed)
        ev.models.connect(self.refresh_models)  # a finetuned model appears at once (issue 13)

    # ================================================================== inputs
    def refresh_models(self) -> None:
        if fill_model_combo(self.model_combo):  # a first or another model: its tiling
            self._model_changed()

    def model_name(self) -> str | None:
        return self.model_combo.currentData()

    def set_model(self, name: str) -> None:
        from ..encoders import get_card

        get_card(name)  # an unknown name raises UnknownModelError listing the known ones
        self.refresh_models()
        i = self.model_combo.findData(name)
        if i < 0:
            raise ValueError(f"model {name!r} is not in the registry")
        self.model_combo.setCurrentIndex(i)

    def set_preset(self, name: str) -> None:
        apply_preset(self, name)

    def _model_changed(self, *_) -> None:
        """Another model: show its card's recommended tiling (GPFM: its authors' 128 µm
        field), which the user may then change."""
        from ..encoders import get_card

        name = self.model_name()
        if name:
            show_card_tiling(self, get_card(name))
        self._recipe_changed()

    def _spec_edited(self) -> None:
        mark_custom(self)
        self._recipe_changed()

    def _recipe_changed(self, *_) -> None:
        """Another tiling or model: the patch-grid preview on screen is stale."""
        uid = self.current_uid()
        if uid is not None and self.session.hide_preview(uid):
            self.jobs.say("Tiling or model changed: the old preview was removed. Preview again, "
                          "or Compute (a new feature file is made beside the old one).")

    def tissue_params(self):
        """The tissue detection the current inputs ask for."""
        from ..tiles import TissueParams

        return TissueParams(method=self.tissue_combo.currentData())

    def spec(self):
        """The GridSpec of the current inputs (a preset, or the custom values)."""
        return spec_of(self)

    def out_dir(self) -> Path:
        return self.session.out_dir

    def _choose_out(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Output folder", self.out_edit.text())
        if d:
            self.out_edit.setText(d)
            self.session.set_out_dir(d)

    def _out_dir_changed(self, event=None) -> None:
        if self.out_edit.text() != str(self.session.out_dir):
            self.out_edit.setText(str(self.session.out_dir))

    def current_uid(self) -> int | None:
        return self.layer_combo.currentData()

    def current_layer(self):
        s = self.session.slides.get(self.current_uid())
        return None if s is None else s.layer

    def select_slide(self, layer_or_name: Any) -> None:
        """Make a slide layer (or its name) the dock's current slide."""
        s = self.session.slide(layer_or_name)
        self.layer_combo.setCurrentIndex(self.layer_combo.findData(s.uid))

    def _update_layers(self, event=None) -> None:
        fill_slide_combo(self.layer_combo, self.session)
        current = self.points_combo.currentText()
        names = [la.name for la in self._query_points_layers()]
        self.points_combo.blockSignals(True)
        self.points_combo.clear()
        self.points_combo.addItems(names)
        if current in names:
            self.points_combo.setCurrentText(current)
        self.points_combo.blockSignals(False)
        if self.legend.layer is not None and self.legend.layer not in self.viewer.layers:
            self.legend.set_layer(None)  # its heatmap was removed
        self._refresh_results()

    def _query_points_layers(self) -> list:
        """Points layers the user made (not our own top-hit markers)."""
        return [la for la in self.viewer.layers if type(la).__name__ == "Points"
                and la.metadata.get("napari_gpfm", {}).get("kind") != "top-hits"]  # fmt: skip

    def say(self, text: str, error: bool = False) -> None:
        self.jobs.say(text, error)

    def _checked_slide(self):
        s = self.session.slides.get(self.current_uid())
        if s is None:
            self.say("Open a whole-slide image first (File > Open, or napari-gpfm's sample).", True)
            return None
        if s.mpp is None:
            self.say(MISSING_MPP.format(name=s.name), True)
            return None
        return s

    def _checked_card(self):
        from ..encoders import get_card

        name = self.model_name()
        if name is None:
            self.say("No model cards found in the registry.", True)
            return None
        card = get_card(name)
        if not card.status().found and not self.random_check.isChecked():
            self.say(card.missing_weights_message(), True)
            return None
        return card

    # ================================================================== tissue preview
    def preview_tissue(self) -> Any:
        s = self._checked_slide()
        card = self._checked_card() if s is not None else None
        if card is None:
            return None
        from ..jobs.embed import preview_job

        uid = s.uid
        return self.jobs.run(
            preview_job(s.slide, self.spec(), self.tissue_params(), card.input.size),
            on_result=lambda r: self._show_preview(uid, r), slide=uid,
        )  # fmt: skip

    def _show_preview(self, uid: int, result) -> None:
        if uid not in self.session.slides:
            return
        tissue, grid = result
        self.session.show_preview(uid, tissue, grid)
        spec = grid.spec
        self.say(f"{len(grid):,} patches of {spec.patch_size} px at {spec.target_mpp:g} µm/px "
                 f"({grid.patch_size_level0} px at level 0); {tissue.summary}. Compute "
                 "embeddings to embed them.")  # fmt: skip

    # ================================================================== embed run
    def compute(self, overwrite: bool = False) -> Any:
        """Start (or resume) embedding the current slide; a finished store loads instantly."""
        if self.jobs.busy:
            return self.jobs.worker
        s = self._checked_slide()
        card = self._checked_card() if s is not None else None
        if card is None:
            return None
        from ..jobs.embed import EmbedRequest, embed_or_load

        self.session.set_out_dir(self.out_edit.text())
        req = EmbedRequest(
            slide=s.slide, model=card.name, spec=self.spec(), tissue_params=self.tissue_params(),
            out_dir=self.session.out_dir, device=self.device_combo.currentText(),
            allow_random=self.random_check.isChecked(), batch_size=self.batch_size,
            num_workers=self.num_workers, overwrite=overwrite,
            precision=self.precision_combo.currentText(),
        )  # fmt: skip
        uid = s.uid
        return self.jobs.run(
            embed_or_load(req), slide=uid,
            on_result=lambda out: self._on_embedded(uid, out),
            on_error=lambda exc: self._on_error(uid, exc),
            message=f"Embedding {s.name} with {card.name}…",
        )  # fmt: skip

    def _on_embedded(self, uid: int, outcome) -> None:
        if uid not in self.session.slides:
            return  # the slide layer was removed meanwhile
        s = self.session.attach_store(uid, outcome.store, outcome.index)
        self.session.hide_preview(uid)
        store = outcome.store
        verb = "loaded" if outcome.loaded else "ready"
        self.say(f"{s.name}: {s.n:,} patch embeddings ({store.embed_dim}-d, {store.model}) "
                 f"{verb}: {store.path}")  # fmt: skip
        self.progress.setRange(0, max(s.n, 1))
        self.progress.setValue(s.n)
        self.progress.setFormat("%v / %m patches")
        self._refresh_results()

    def _on_error(self, uid: int, exc: BaseException) -> bool:
        from ..embeddings import PrecisionMismatchError, RecipeMismatchError, SlideMismatchError
        from ..embeddings.store import format_diff
        from ..slide import MissingMppError

        s = self.session.slides.get(uid)
        name = s.name if s is not None else "slide"
        if isinstance(exc, MissingMppError):
            self.say(MISSING_MPP.format(name=name), True)
            return True
        if isinstance(exc, SlideMismatchError):
            from napari.utils.notifications import show_error

            text = (f"{name}: the feature file {exc.path} was computed from {exc.recorded}, "
                    f"but this slide is {exc.current}: a different slide with the same name. "
                    "Choose another output folder for it (Output folder above).")
            self.say(text, True)
            show_error(text)
            return True
        if isinstance(exc, RecipeMismatchError) and s is not None:
            question = (f"{name}: a feature file for this model and tiling already exists "
                        f"({exc.path}), made with different settings: {format_diff(exc.diff)}.")
            if isinstance(exc, PrecisionMismatchError):  # names both precisions, or "unknown"
                question = f"{name}: the feature file {exc.path} {exc.problem}."
            if self.confirm_overwrite(question):
                self._overwrite_next = True  # run again once this job has ended
                self.say("Replacing the feature file…")
                return True
            self.say(f"{question} Kept it; choose another output folder to keep both.", True)
            return True
        return False

    def _after_job(self, outcome: str) -> None:
        if getattr(self, "_overwrite_next", False):
            self._overwrite_next = False
            self.compute(overwrite=True)

    def confirm_overwrite(self, message: str) -> bool:
        """Ask before replacing a feature file made with another recipe."""
        answer = QMessageBox.question(
            self, "Replace the feature file?",
            f"{message}\n\nReplace it with features computed with the current settings? (The old "
            "file is kept until the new one is complete.)",
        )  # fmt: skip
        return answer == QMessageBox.StandardButton.Yes

    def cancel(self) -> None:
        self.jobs.cancel()

    # ================================================================== results
    def session_state(self):
        """The current slide's state in the session (``None`` without a slide)."""
        return self.session.slides.get(self.current_uid())

    def _require_session(self):
        s = self.session_state()
        if s is None or not s.has_store:
            self.say("Compute (or load) embeddings for this slide first.", True)
            return None
        return s

    def cluster(self, k: int | None = None) -> Any:
        s = self._require_session()
        if s is None:
            return None
        from ..jobs.cluster import cluster_job

        k = int(k or self.k_spin.value())
        uid = s.uid
        return self.cluster_jobs.run(
            cluster_job(s.features, k), slide=uid,
            on_result=lambda res: self._on_clustered(uid, res),
            message=f"Clustering {s.n:,} patches into {k}…",
        )  # fmt: skip

    def _on_clustered(self, uid: int, res) -> None:
        if uid not in self.session.slides:
            return
        self.session.set_clusters(uid, res)
        self.session.show_clusters(uid)
        s = self.session.slides[uid]
        self.cluster_jobs.say(f"{s.name}: {int(res.labels.max()) + 1} clusters "
                              f"({res.method} k-means).")  # fmt: skip

    def _refresh_results(self, event=None) -> None:
        s = self.session_state()
        rows = s.cluster_rows() if s is not None and s.has_store else []
        k = 0 if s is None or s.clusters is None else int(s.clusters.labels.max()) + 1
        legend = convert.cluster_legend(k)
        self.cluster_table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            area = row.get("area_um2")
            name, rgba = legend[row["cluster"]]
            cells = [name, f"{row['count']:,}", f"{100 * row['fraction']:.1f}",
                     f"{area / 1e6:.4f}" if area is not None else f"{row['area_px2']:.0f} px²"]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c == 0:
                    item.setIcon(_swatch(rgba))
                    item.setData(Qt.ItemDataRole.UserRole, [float(v) for v in rgba])
                self.cluster_table.setItem(r, c, item)
        self._refresh_exemplars(s)
        self._refresh_values()

    def _refresh_exemplars(self, s) -> None:
        """The patches nearest each cluster centre of the current slide (read again only when
        the slide or its clusters changed)."""
        key = None if s is None or s.clusters is None else (s.uid, id(s.clusters))
        if key == self._exemplars_of:
            return
        self._exemplars_of = key
        self.exemplars.set_tiles(exemplar_tiles(s) if key is not None else [])
        self.exemplars_label.setVisible(key is not None)

    def _refresh_values(self, event=None) -> None:
        s = self.session_state()
        keys = [k for k in (s.values if s is not None else {}) if k != "cluster"]
        current = self.value_combo.currentData()
        self.value_combo.clear()
        for k in keys:
            self.value_combo.addItem(HEATMAP_LABELS.get(k, k), k)
        if current in keys:
            self.value_combo.setCurrentIndex(keys.index(current))

    def show_heatmap(self, key: str | None = None) -> Any:
        s = self._require_session()
        key = key or self.value_combo.currentData()
        if s is None or key is None:
            if s is not None:
                self.say("No per-patch values yet: cluster or run a similarity query.", True)
            return None
        layer = self.session.show_heatmap(s.uid, key, colormap=self.cmap_combo.currentText(),
                                          opacity=self.opacity_spin.value())  # fmt: skip
        self.legend.set_layer(layer, HEATMAP_LABELS.get(key, key.replace("_", " ")))
        return layer

    # ================================================================== similarity
    def _session_at(self, world) -> tuple[Any, int]:
        """The slide and patch under a world point: the current slide first, then the other
        visible embedded slides, top layer first."""
        order = [self.session_state()] + [
            self.session.slides.get(int(la.unique_id)) for la in reversed(self.viewer.layers)
            if la.visible
        ]  # fmt: skip
        for s in order:
            if s is not None and s.has_store:
                i = s.patch_at(np.asarray(world, float)[-2:])
                if i >= 0:
                    return s, int(i)
        return None, -1

    def handle_click(self, world, wait: bool = True) -> Any:
        """Similarity query from a click at world position (y, x) in µm; returns the result
        (``None`` with ``wait=False`` when the query waits for an index job: see :meth:`query`)."""
        s, i = self._session_at(world)
        if s is None:
            self.sim_jobs.say("No embedded patch under the click.")
            return None
        return self.query(s.uid, [i], wait=wait)

    def query_points(self, layer_name: str | None = None, wait: bool = True) -> Any:
        """Similarity query from every point of a Points layer (averaged)."""
        name = layer_name or self.points_combo.currentText()
        if not name or name not in self.viewer.layers:
            self.sim_jobs.say("Add a Points layer and place points on patches first.", True)
            return None
        pts = self.viewer.layers[name]
        world = np.array([pts.data_to_world(p) for p in pts.data]).reshape(-1, pts.ndim)
        s = self._require_session()
        if s is None:
            return None
        idx = np.atleast_1d(s.patch_at(world[:, -2:]))
        idx = idx[idx >= 0]
        if idx.size == 0:
            self.sim_jobs.say(f"None of the points of {name!r} lie on an embedded patch of "
                              f"{s.name}.", True)  # fmt: skip
            return None
        return self.query(s.uid, idx, wait=wait)

    def _cold_peers(self, uid: int) -> list:
        """Slides the query will score whose similarity index is not built yet (finished
        stores of the same model in the output folder are attached first, as the query does)."""
        s = self.session.get(uid)
        for other in list(self.session.slides.values()):
            if not other.has_store and s.model:
                self.session.find_store(other.uid, s.model)
        return [p for p in self.session.compatible(uid) if not p.index_ready]

    def query(self, uid: int, indices, wait: bool = True) -> Any:
        """Similarity of every patch of every compatible slide to patches ``indices`` of slide
        ``uid``: heatmaps, outlined hits and the hits gallery.

        Runs at once when every slide's index is built (the embed job builds it). Otherwise an
        index job reads the features in a worker first (the dock says so) and the query runs
        when it ends; ``wait=True`` (scripts) processes Qt events until then and returns the
        result, ``wait=False`` (mouse clicks) returns ``None`` at once. The latest query waiting
        for an index is the one that runs."""
        try:
            cold = self._cold_peers(uid)
        except (ValueError, LookupError) as exc:
            self.sim_jobs.say(str(exc), True)
            return None
        if not cold and not self.sim_jobs.busy:
            return self._query_now(uid, indices)
        self._pending_query = (int(uid), np.asarray(indices))
        self._query_result = None
        if not self.sim_jobs.busy:
            n = sum(p.n for p in cold)
            self._sim_bar(True)
            self.sim_jobs.run(index_job(cold), slide=uid,
                              message=f"Similarity: indexing {n:,} patches of {len(cold)} "
                                      "slide(s) first…")  # fmt: skip
        if not wait:
            return None
        self.sim_jobs.wait(600)
        return self._query_result

    def _sim_bar(self, visible: bool) -> None:
        """The similarity progress bar shows only while an index is built."""
        self.sim_jobs.bar.setVisible(visible)
        self.sim_jobs.cancel_button.setVisible(visible)

    def _after_indexing(self, outcome: str) -> None:
        self._sim_bar(False)
        pending, self._pending_query = self._pending_query, None
        if pending is None:
            return
        if outcome != "done":
            if outcome == "cancelled":
                self.sim_jobs.say("Similarity query cancelled.")
            return
        if pending[0] in self.session.slides:
            self._query_result = self.query(*pending, wait=False)

    def _query_now(self, uid: int, indices) -> Any:
        t0 = time.perf_counter()
        try:
            res = self.session.similarity(uid, indices, k=self.topk_spin.value())
            self.sim_jobs.say(f"Drawing the similarity map on {len(res.scores)} slide(s)…")
            self.sim_jobs.status.repaint()  # seen before the (main-thread) layer work
            layers = self.session.show_similarity(res)
        except (ValueError, LookupError) as exc:
            self.sim_jobs.say(str(exc), True)
            return None
        self.last_result = res
        mine = [la for la in layers if la.metadata.get(convert.META_KEY, {}).get("slide_uid")
                == uid and la.metadata[convert.META_KEY].get("kind") == "heatmap"]  # fmt: skip
        if mine:
            self.legend.set_layer(mine[0], HEATMAP_LABELS["similarity"])
        name = self.session.slides[uid].name
        self.sim_jobs.say(f"Similarity to {len(res.query)} patch(es) of {name} on "
                          f"{len(res.scores)} slide(s) in "
                          f"{1000 * (time.perf_counter() - t0):.0f} ms; best hits below "
                          "(click one to go there).")  # fmt: skip
        return res

    def _show_hits(self, event=None) -> None:
        res = event.value if event is not None else self.last_result
        self.hits_gallery.set_tiles(hit_tiles(res) if res is not None else [])

    def go_to_hit(self, row: int) -> None:
        """Centre the camera on the ``row``-th hit, a few patch widths across the canvas."""
        if self.last_result is None or not 0 <= row < len(self.last_result.hits):
            return
        uid, idx, _ = self.last_result.hits[row]
        self.go_to_patch(uid, idx)

    def go_to_patch(self, uid: int, index: int) -> None:
        """Centre the camera on patch ``index`` of slide ``uid`` (a gallery click)."""
        if not centre_on_patch(self.viewer, self.session, uid, index):
            self.sim_jobs.say("That slide was closed.", True)

    # ---- mouse -------------------------------------------------------------------------
    def _on_mouse_drag(self, viewer, event):
        """A click (press and release without moving) queries; a drag pans as usual."""
        if not self.click_check.isChecked() or not self.session.embedded():
            return
        if event.type != "mouse_press" or "Alt" in event.modifiers:
            return
        active = self.viewer.layers.selection.active
        if active is not None and getattr(active, "mode", "pan_zoom") != "pan_zoom":
            return  # the user is drawing or editing a layer
        start = np.asarray(event.position, float)
        moved = False
        yield
        while event.type == "mouse_move":
            if np.abs(np.asarray(event.position, float) - start).max() > 0:
                moved = True
            yield
        if event.type == "mouse_release" and not moved:
            self.handle_click(event.position, wait=False)

    def _on_mouse_move(self, viewer, event):
        if not self.session.embedded():
            return
        s, i = self._session_at(event.position)
        now = (s.uid, i) if s is not None else None
        if now != self._hovering:
            self._hovering = now
            self.session.hover(s.uid if s is not None else -1, i)

    # ================================================================== export
    def export(self, what=("png", "table", "geojson"), where: str | Path | None = None,
               downsample: float | None = None) -> Any:  # fmt: skip
        """Export the current slide's results (every file written atomically):

        - ``"png"``, the maps: each heatmap and the cluster map as a pyramid TIFF over the whole
          slide (a value per pixel, at the slide's level-0 size, or ``downsample`` level-0
          pixels per pixel) and as a per-patch PNG overlay with its placement sidecar;
        - ``"table"``: the per-patch table (CSV; Parquet when the name ends ``.parquet``);
        - ``"geojson"``: QuPath GeoJSON, one detection per patch, and the cluster regions
          beside it (``…_clusters.geojson``).

        One kind without ``where`` (the dock's buttons) asks with a file dialog opening in the
        project folder (the session's output folder), and for maps at which resolution (full
        resolution first), then writes in the background (progress and Cancel in the dock, the
        files listed when done); returns the job's worker (``None``: nothing to export, or the
        user cancelled). Otherwise everything goes into ``where`` (default ``<project folder>/
        exports``) at once and the files written are returned (for scripts)."""
        import os
        import shutil
        import tempfile

        from ..analyses.export import write_map_tiff, write_table
        from .annotate_widget import ask_downsample, files_job, map_export_job

        s = self._require_session()
        if s is None:
            return [] if len(tuple(what)) != 1 or where is not None else None
        what = tuple(what)
        project = self.session.out_dir
        size = tuple(int(v) for v in s.slide.dimensions)
        k = 0 if s.clusters is None else int(s.clusters.labels.max()) + 1
        maps = [(key, s.heatmap(key), {"kind": "heatmap", "value": key,
                                       "label": HEATMAP_LABELS.get(key, key)})
                for key in s.values if key != "cluster"]  # fmt: skip
        if k:
            maps.append(("clusters", s.labels(), {
                "kind": "clusters", "values": "cluster i painted i + 1, 0 = no patch",
                "classes": ["none"] + [f"Cluster {i}" for i in range(k)]}))  # fmt: skip
        if len(what) != 1 or where is not None:  # scripts: everything, no questions
            out = Path(where) if where is not None else project / "exports"
            try:
                files = s.export(out, what)
                if "png" in what:
                    for key, raster, meta in maps:
                        files.append(Path(write_map_tiff(
                            out / f"{s.name}_{key}.tif", raster, size, downsample or 1.0,
                            mpp=s.mpp, metadata=meta)))  # fmt: skip
            except OSError as e:  # shown, not raised: the user picks another folder
                self.say(f"Export failed: {e}", True)
                return []
            self.say(f"Wrote {len(files)} file(s) to {out}: " + ", ".join(p.name for p in files))
            return files

        def said(files: list[Path]) -> None:
            self.say(f"Wrote {len(files)} file(s): " + ", ".join(str(p) for p in files))

        kind = what[0]
        if kind == "png":
            if not maps:
                self.say("No maps to export yet: cluster, or run a similarity query.", True)
                return None
            folder = QFileDialog.getExistingDirectory(self, "Export the maps to", str(project))
            if not folder:
                return None
            d = downsample if downsample is not None else ask_downsample(self, size)
            if d is None:
                return None
            folder = Path(folder)
            jobs = [(folder / f"{s.name}_{key}.tif", r, m) for key, r, m in maps]
            per_patch = lambda: s.export(folder, ("png",))  # noqa: E731 - PNGs + sidecars
            return self.jobs.run(map_export_job(jobs, size, d, s.mpp, per_patch),
                                 on_result=said, message=f"Writing {len(jobs)} map(s) of "
                                                         f"{s.name} at 1/{d:g} of level 0…")
        suffix, title, filters = {
            "table": (".csv", "Per-patch table", "CSV (*.csv);;Parquet (*.parquet)"),
            "geojson": (".geojson", "QuPath GeoJSON", "GeoJSON (*.geojson)"),
        }[kind]  # fmt: skip
        path, _ = QFileDialog.getSaveFileName(
            self, title, str(project / f"{s.name}_patches{suffix}"), filters)
        if not path:
            return None
        path = Path(path)
        if path.suffix.lower() not in (".csv", ".parquet", ".geojson", ".json"):
            path = path.with_name(path.name + suffix)

        def write() -> list[Path]:
            if kind == "table":
                return [Path(write_table(path, s.coords, s.columns()))]
            tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
            try:  # written beside the destination, then renamed to the names chosen
                files = []
                for made in s.export(tmp, ("geojson",)):
                    dest = path if made.name.endswith("_patches.geojson") else \
                        path.with_name(f"{path.stem}_clusters{path.suffix}")  # fmt: skip
                    os.replace(made, dest)
                    files.append(dest)
                return files
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return self.jobs.run(files_job(write, f"writing {path.name}"), on_result=said,
                             message=f"Writing {path}…")
