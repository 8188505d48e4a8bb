"""The "GPFM" dock: embed a slide, then clusters, heatmaps, similarity search and export.

Thin over the window's :class:`~napari_gpfm.layers.session.ViewerSession` (shared with every
other dock) and the jobs of :mod:`napari_gpfm.jobs`: inputs are gathered here, long work runs
through a :class:`~._jobs.JobPanel`, results go into the session, which builds every layer.
Features are written to ``<output folder>/<tiling>/features_<model>/<slide>.h5``; the output
folder is the session's (default ``~/.cache/napari-gpfm/features``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtGui import QColor
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
    QMessageBox,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..layers import convert
from ..layers.session import HEATMAP_LABELS, session_for
from ._jobs import JobPanel, fit_width, settle_width, wrap_in_scroll

CUSTOM = "custom"
DEVICES = ("auto", "cpu", "cuda")
COLORMAPS = ("viridis", "inferno", "magma", "plasma", "turbo", "gray")
MISSING_MPP = (
    "{name}: the slide does not record its pixel size (µm/px), so patches cannot be cut at an "
    "exact magnification. Set it in the 'Slide info' panel (Plugins > napari-gpfm > Slide "
    "info), then compute again."
)


def model_label(card: Any) -> str:
    """Combo text: name, display name, whether weights are present, GPFM or not."""
    flag = "" if card.is_gpfm else " (not GPFM)"
    weights = "weights found" if card.status().found else "weights missing"
    return f"{card.name}{flag} — {card.display_name} [{weights}]"


def _detacher(viewer, drag_cb, move_cb):
    """A slot removing the dock's mouse callbacks from the viewer once the dock is deleted
    (a closure: the widget itself is gone by then)."""

    def detach(*_):
        for callbacks, cb in ((viewer.mouse_drag_callbacks, drag_cb),
                              (viewer.mouse_move_callbacks, move_cb)):  # fmt: skip
            if cb in callbacks:
                callbacks.remove(cb)

    return detach


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

    # ================================================================== construction
    def _build(self, allow_random: bool) -> None:
        from ..tiles import PRESETS

        self.layer_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.setToolTip(
            "Models of the registry (models/*.yaml and your models folder). Non-GPFM models "
            "are flagged '(not GPFM)'."
        )
        self.random_check = QCheckBox("Random weights (testing)")
        self.random_check.setToolTip("Allow a randomly initialised model when its weights are "
                                     "missing: for testing the workflow only.")
        self.random_check.setChecked(allow_random)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([*PRESETS, CUSTOM])
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.05, 20.0)
        self.mpp_spin.setDecimals(3)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSuffix(" µm/px")
        self.size_spin = QSpinBox()
        self.size_spin.setRange(16, 4096)
        self.size_spin.setSuffix(" px")
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setRange(0, 4095)
        self.overlap_spin.setSuffix(" px")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
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

        embed_box = QGroupBox("Embeddings")
        form = QFormLayout(embed_box)
        form.addRow("Slide layer", self.layer_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("", self.random_check)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Target mpp", self.mpp_spin)
        form.addRow("Patch size", self.size_spin)
        form.addRow("Overlap", self.overlap_spin)
        form.addRow("Device", self.device_combo)
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
        self.cluster_table.horizontalHeader().setStretchLastSection(True)
        self.cluster_table.setMaximumHeight(180)
        cl_box = self.cluster_box = QGroupBox("Clusters")
        cl = QVBoxLayout(cl_box)
        row = QHBoxLayout()
        row.addWidget(QLabel("k"))
        row.addWidget(self.k_spin)
        row.addWidget(self.cluster_button)
        cl.addLayout(row)
        cl.addWidget(self.cluster_jobs)
        cl.addWidget(self.cluster_table)

        # heatmaps
        self.value_combo = QComboBox()
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(COLORMAPS)
        self.opacity_spin = QDoubleSpinBox()
        self.opacity_spin.setRange(0.0, 1.0)
        self.opacity_spin.setSingleStep(0.05)
        self.opacity_spin.setValue(0.6)
        self.heatmap_button = QPushButton("Show heatmap")
        hm_box = QGroupBox("Heatmap")
        hm = QFormLayout(hm_box)
        hm.addRow("Value", self.value_combo)
        hm.addRow("Colormap", self.cmap_combo)
        hm.addRow("Opacity", self.opacity_spin)
        hm.addRow(self.heatmap_button)

        # similarity
        self.click_check = QCheckBox("Click on the slide to query (Alt-drag still pans)")
        self.click_check.setChecked(True)
        self.points_combo = QComboBox()
        self.points_button = QPushButton("Query points layer")
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(1, 500)
        self.topk_spin.setValue(10)
        self.hits_table = QTableWidget(0, 3)
        self.hits_table.setHorizontalHeaderLabels(["slide", "patch", "cosine"])
        self.hits_table.horizontalHeader().setStretchLastSection(True)
        self.hits_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.hits_table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        sim_box = QGroupBox("Similarity search")
        sim = QFormLayout(sim_box)
        sim.addRow(self.click_check)
        prow = QHBoxLayout()
        prow.addWidget(self.points_combo)
        prow.addWidget(self.points_button)
        sim.addRow("Points", prow)
        sim.addRow("Top k", self.topk_spin)
        sim.addRow(self.hits_table)

        # export
        self.export_buttons = {
            "png": QPushButton("PNG overlays"),
            "table": QPushButton("Patch table"),
            "geojson": QPushButton("QuPath GeoJSON"),
        }
        ex_box = QGroupBox("Export (to <output folder>/exports)")
        ex = QHBoxLayout(ex_box)
        for b in self.export_buttons.values():
            ex.addWidget(b)

        inner = QWidget()
        lay = QVBoxLayout(inner)
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
        self.model_combo.currentIndexChanged.connect(self._recipe_changed)
        self.random_check.toggled.connect(lambda _: self.refresh_models())
        self.out_button.clicked.connect(self._choose_out)
        self.out_edit.editingFinished.connect(
            lambda: self.session.set_out_dir(self.out_edit.text()))
        self.preview_button.clicked.connect(lambda: self.preview_tissue())
        self.compute_button.clicked.connect(lambda: self.compute())
        self.jobs.finished.connect(self._after_job)
        self.cluster_button.clicked.connect(lambda: self.cluster())
        self.heatmap_button.clicked.connect(lambda: self.show_heatmap())
        self.points_button.clicked.connect(lambda: self.query_points())
        self.hits_table.cellClicked.connect(lambda r, _c: self.go_to_hit(r))
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
        ev.out_dir.connect(self._out_dir_changed)

    # ================================================================== inputs
    def refresh_models(self) -> None:
        from ..encoders import default_model_name, list_cards

        current = self.model_name()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for card in list_cards():
            self.model_combo.addItem(model_label(card), card.name)
        preferred = current or default_model_name()
        i = self.model_combo.findData(preferred) if preferred else -1
        self.model_combo.setCurrentIndex(max(i, 0))
        self.model_combo.blockSignals(False)

    def model_name(self) -> str | None:
        return self.model_combo.currentData()

    def set_model(self, name: str) -> None:
        self.refresh_models()
        i = self.model_combo.findData(name)
        if i < 0:
            raise ValueError(f"model {name!r} is not in the registry")
        self.model_combo.setCurrentIndex(i)

    def set_preset(self, name: str) -> None:
        from ..tiles import PRESETS

        if name not in PRESETS:
            return
        spec = PRESETS[name]
        for spin, v in ((self.mpp_spin, spec.target_mpp), (self.size_spin, spec.patch_size),
                        (self.overlap_spin, spec.overlap)):  # fmt: skip
            spin.blockSignals(True)
            spin.setValue(v)
            spin.blockSignals(False)

    def _spec_edited(self) -> None:
        if self.preset_combo.currentText() != CUSTOM:
            self.preset_combo.blockSignals(True)
            self.preset_combo.setCurrentText(CUSTOM)
            self.preset_combo.blockSignals(False)
        self._recipe_changed()

    def _recipe_changed(self, *_) -> None:
        """Another tiling or model: the patch-grid preview on screen is stale."""
        uid = self.current_uid()
        if uid is not None and self.session.hide_preview(uid):
            self.jobs.say("Tiling or model changed: the old preview was removed. Preview again, "
                          "or Compute (a new feature file is made beside the old one).")

    def spec(self):
        """The GridSpec of the current inputs (a preset, or the custom values)."""
        from ..tiles import PRESETS, GridSpec

        name = self.preset_combo.currentText()
        if name in PRESETS:
            return PRESETS[name]
        return GridSpec(target_mpp=self.mpp_spin.value(), patch_size=self.size_spin.value(),
                        overlap=self.overlap_spin.value())  # fmt: skip

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
        from ..tiles import TissueParams

        uid = s.uid
        return self.jobs.run(
            preview_job(s.slide, self.spec(), TissueParams(), card.input.size),
            on_result=lambda r: self._show_preview(uid, r), slide=uid,
        )  # fmt: skip

    def _show_preview(self, uid: int, result) -> None:
        if uid not in self.session.slides:
            return
        tissue, grid = result
        self.session.show_preview(uid, tissue, grid)
        spec = grid.spec
        self.say(f"{len(grid):,} patches of {spec.patch_size} px at {spec.target_mpp:g} µm/px "
                 f"({grid.patch_size_level0} px at level 0) on {tissue.tissue_fraction:.0%} "
                 "tissue. Compute embeddings to embed them.")  # fmt: skip

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
        from ..tiles import TissueParams

        self.session.set_out_dir(self.out_edit.text())
        req = EmbedRequest(
            slide=s.slide, model=card.name, spec=self.spec(), tissue_params=TissueParams(),
            out_dir=self.session.out_dir, device=self.device_combo.currentText(),
            allow_random=self.random_check.isChecked(), batch_size=self.batch_size,
            num_workers=self.num_workers, overwrite=overwrite,
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
        from ..embeddings import RecipeMismatchError, SlideMismatchError
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
        self.cluster_table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            area = row.get("area_um2")
            cells = [f"{row['cluster']}", f"{row['count']:,}", f"{100 * row['fraction']:.1f}",
                     f"{area / 1e6:.4f}" if area is not None else f"{row['area_px2']:.0f} px²"]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c == 0:
                    rgb = convert.CLUSTER_COLOURS[row["cluster"] % len(convert.CLUSTER_COLOURS)]
                    item.setBackground(QColor(*(int(v * 255) for v in rgb)))
                self.cluster_table.setItem(r, c, item)
        self._refresh_values()

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
        return self.session.show_heatmap(s.uid, key, colormap=self.cmap_combo.currentText(),
                                         opacity=self.opacity_spin.value())  # fmt: skip

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

    def handle_click(self, world) -> Any:
        """Similarity query from a click at world position (y, x) in µm; returns the result."""
        s, i = self._session_at(world)
        if s is None:
            self.say("No embedded patch under the click.")
            return None
        return self.query(s.uid, [i])

    def query_points(self, layer_name: str | None = None) -> Any:
        """Similarity query from every point of a Points layer (averaged)."""
        name = layer_name or self.points_combo.currentText()
        if not name or name not in self.viewer.layers:
            self.say("Add a Points layer and place points on patches first.", True)
            return None
        pts = self.viewer.layers[name]
        world = np.array([pts.data_to_world(p) for p in pts.data]).reshape(-1, pts.ndim)
        s = self._require_session()
        if s is None:
            return None
        idx = np.atleast_1d(s.patch_at(world[:, -2:]))
        idx = idx[idx >= 0]
        if idx.size == 0:
            self.say(f"None of the points of {name!r} lie on an embedded patch of {s.name}.", True)
            return None
        return self.query(s.uid, idx)

    def query(self, uid: int, indices) -> Any:
        t0 = time.perf_counter()
        try:
            res = self.session.similarity(uid, indices, k=self.topk_spin.value())
            self.session.show_similarity(res)
        except (ValueError, LookupError) as exc:
            self.say(str(exc), True)
            return None
        self.last_result = res
        self._fill_hits(res)
        name = self.session.slides[uid].name
        self.say(f"Similarity to {len(res.query)} patch(es) of {name} on {len(res.scores)} "
                 f"slide(s) in {1000 * (time.perf_counter() - t0):.0f} ms.")  # fmt: skip
        return res

    def _fill_hits(self, res) -> None:
        self.hits_table.setRowCount(len(res.hits))
        for r, (uid, idx, score) in enumerate(res.hits):
            for c, text in enumerate((res.names.get(uid, "?"), str(idx), f"{score:.4f}")):
                self.hits_table.setItem(r, c, QTableWidgetItem(text))

    def go_to_hit(self, row: int) -> None:
        """Centre the camera on the row's patch, a few patch widths across the canvas."""
        if self.last_result is None or not 0 <= row < len(self.last_result.hits):
            return
        uid, idx, _ = self.last_result.hits[row]
        s = self.session.slides.get(uid)
        if s is None:
            self.say("That slide was closed.", True)
            return
        canvas = tuple(self.viewer.canvas.size)
        centre, zoom = convert.camera_for_patch(s.coords[idx], s.patch_size_level0, s.mpp,
                                                canvas, offset=s.offset)  # fmt: skip
        camera = self.viewer.scene.camera
        camera.center = centre
        camera.zoom = zoom
        if s.layer is not None:
            s.layer.visible = True

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
            self.handle_click(event.position)

    def _on_mouse_move(self, viewer, event):
        if not self.session.embedded():
            return
        s, i = self._session_at(event.position)
        now = (s.uid, i) if s is not None else None
        if now != self._hovering:
            self._hovering = now
            self.session.hover(s.uid if s is not None else -1, i)

    # ================================================================== export
    def export(self, what=("png", "table", "geojson")) -> list[Path]:
        s = self._require_session()
        if s is None:
            return []
        out = self.session.out_dir / "exports"
        try:
            files = s.export(out, what)
        except OSError as e:  # shown, not raised: the user picks another folder
            self.say(f"Export failed: {e}", True)
            return []
        self.say(f"Wrote {len(files)} file(s) to {out}: " + ", ".join(p.name for p in files))
        return files
