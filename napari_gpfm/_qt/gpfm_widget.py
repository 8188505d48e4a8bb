"""The "GPFM" dock: embed a slide, then clusters, heatmaps, similarity search and export.

Thin over the core: inputs are gathered here, long work runs in thread workers
(:mod:`._workers`), and results go through the viewer's headless
:class:`~napari_gpfm.layers.session.Explorer`, which builds every layer
(:mod:`napari_gpfm.layers.convert`). Only main-thread slots touch layers.

Features are written to ``~/.cache/napari-gpfm/features`` unless another output folder is
chosen (slides often sit on read-only shares; see
:func:`~napari_gpfm.layers.session.default_out_dir`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, Signal
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
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..layers import convert
from ..layers.reader import layer_slide
from ..layers.session import HEATMAP_LABELS, default_out_dir, explorer_for
from . import _workers

CUSTOM = "custom"
DEVICES = ("auto", "cpu", "cuda")
COLORMAPS = ("viridis", "inferno", "magma", "plasma", "turbo", "gray")
MISSING_MPP = (
    "{name}: the slide does not record its pixel size (µm/px), so patches cannot be cut at an "
    "exact magnification. Set it in the 'Slide info' panel (Plugins > napari-gpfm > Slide "
    "info), then compute again."
)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


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


class GPFMWidget(QWidget):
    """Dock widget; ``napari_viewer`` is injected by napari."""

    #: Emitted on the main thread when an embed run ends: "done", "loaded", "cancelled", "error".
    run_finished = Signal(str)

    def __init__(self, napari_viewer, allow_random: bool = False):
        super().__init__()
        _workers.avoid_llvm_clash()
        self.viewer = napari_viewer
        self.explorer = explorer_for(napari_viewer)
        self.worker: Any = None
        self._cancel_t: float | None = None
        self._busy: list[Any] = []  # other running workers (kept alive)
        self.last_progress: Any = None
        self.last_result: Any = None
        self._build(allow_random)
        self._connect()
        self._update_layers()
        self.refresh_models()
        self.viewer.mouse_drag_callbacks.append(self._on_mouse_drag)
        self.viewer.mouse_move_callbacks.append(self._on_mouse_move)
        self.destroyed.connect(_detacher(self.viewer, self._on_mouse_drag, self._on_mouse_move))

    # ================================================================== construction
    def _build(self, allow_random: bool) -> None:
        from ..tiles import PRESETS

        self.layer_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.setToolTip(
            "Models of the registry (models/*.yaml and your models folder). Non-GPFM models "
            "are flagged '(not GPFM)'."
        )
        self.random_check = QCheckBox("Allow random weights (testing only)")
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
        self.out_edit = QLineEdit(str(default_out_dir()))
        self.out_edit.setToolTip("Feature files go to <folder>/features_<model>/<slide>.h5. "
                                 "Default: ~/.cache/napari-gpfm/features (writable even when "
                                 "slides are on read-only shares).")  # fmt: skip
        self.out_button = QPushButton("…")
        self.out_button.setFixedWidth(28)
        self.preview_button = QPushButton("Preview tissue")
        self.compute_button = QPushButton("Compute embeddings")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m patches")
        self.progress.setValue(0)
        self.status = QLabel("Open a slide, pick a model, then Preview tissue or Compute.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

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
        for b in (self.preview_button, self.compute_button, self.cancel_button):
            buttons.addWidget(b)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.status)

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
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        for combo in (self.layer_combo, self.model_combo, self.points_combo, self.value_combo):
            combo.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
            )
            combo.setMinimumContentsLength(12)
        self.set_preset(self.preset_combo.currentText())

    def _connect(self) -> None:
        self.preset_combo.currentTextChanged.connect(self.set_preset)
        for spin in (self.mpp_spin, self.size_spin, self.overlap_spin):
            spin.valueChanged.connect(self._spec_edited)
        self.random_check.toggled.connect(lambda _: self.refresh_models())
        self.out_button.clicked.connect(self._choose_out)
        self.preview_button.clicked.connect(self.preview_tissue)
        self.compute_button.clicked.connect(self.compute)
        self.cancel_button.clicked.connect(self.cancel)
        self.cluster_button.clicked.connect(lambda: self.cluster())
        self.heatmap_button.clicked.connect(lambda: self.show_heatmap())
        self.points_button.clicked.connect(lambda: self.query_points())
        self.hits_table.cellClicked.connect(lambda r, _c: self.go_to_hit(r))
        for what, b in self.export_buttons.items():
            b.clicked.connect(lambda _=False, w=what: self.export((w,)))
        self.layer_combo.currentTextChanged.connect(lambda _: self._refresh_results())
        self.viewer.layers.events.inserted.connect(self._update_layers)
        self.viewer.layers.events.removed.connect(self._update_layers)
        self.explorer.events.clusters.connect(self._refresh_results)
        self.explorer.events.similarity.connect(self._refresh_values)

    # ================================================================== inputs
    def refresh_models(self) -> None:
        from ..encoders import default_model_name, list_cards

        current = self.model_name()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for card in list_cards():
            self.model_combo.addItem(model_label(card), card.name)
        try:
            preferred = current or default_model_name()
        except Exception:
            preferred = current
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

    def spec(self):
        """The GridSpec of the current inputs (a preset, or the custom values)."""
        from ..tiles import PRESETS, GridSpec

        name = self.preset_combo.currentText()
        if name in PRESETS:
            return PRESETS[name]
        return GridSpec(target_mpp=self.mpp_spin.value(), patch_size=self.size_spin.value(),
                        overlap=self.overlap_spin.value())  # fmt: skip

    def out_dir(self) -> Path:
        return Path(self.out_edit.text()).expanduser()

    def _choose_out(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Output folder", self.out_edit.text())
        if d:
            self.out_edit.setText(d)

    def slide_layers(self) -> list:
        return [la for la in self.viewer.layers if layer_slide(la) is not None]

    def current_layer(self):
        name = self.layer_combo.currentText()
        return next((la for la in self.slide_layers() if la.name == name), None)

    def _update_layers(self, event=None) -> None:
        for combo, layers in ((self.layer_combo, self.slide_layers()),
                              (self.points_combo, self._query_points_layers())):  # fmt: skip
            current = combo.currentText()
            names = [la.name for la in layers]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        for name in list(self.explorer.sessions):
            if name not in self.viewer.layers:
                del self.explorer.sessions[name]
        self._refresh_results()

    def _query_points_layers(self) -> list:
        """Points layers the user made (not our own top-hit markers)."""
        return [la for la in self.viewer.layers if la._type_string == "points"
                and la.metadata.get("napari_gpfm", {}).get("kind") != "top-hits"]  # fmt: skip

    def say(self, text: str, error: bool = False) -> None:
        self.status.setStyleSheet("color: #e06c6c;" if error else "")
        self.status.setText(text)

    def _checked_slide(self):
        layer = self.current_layer()
        if layer is None:
            self.say("Open a whole-slide image first (File > Open, or napari-gpfm's sample).", True)
            return None, None
        slide = layer_slide(layer)
        if slide.mpp is None:
            self.say(MISSING_MPP.format(name=layer.name), True)
            return None, None
        return layer, slide

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
        layer, slide = self._checked_slide()
        card = self._checked_card() if layer is not None else None
        if card is None:
            return None
        from ..layers.session import preview_tissue
        from ..tiles import TissueParams

        self.say("Detecting tissue…")
        w = _workers.start_function_worker(
            preview_tissue, slide, self.spec(), TissueParams(), card.input.size,
            returned=lambda r: self._show_preview(layer.name, r),
            errored=lambda e: self.say(f"Tissue preview failed: {e}", True),
        )  # fmt: skip
        self._keep(w)
        return w

    def _show_preview(self, name: str, result) -> None:
        tissue, grid = result
        offset = tuple(np.asarray(self.viewer.layers[name].translate, float)[-2:])
        self.explorer.show_tissue(name, tissue, grid, offset)
        self.viewer.layers.selection.active = self.viewer.layers[name]
        spec = grid.spec
        self.say(f"{len(grid):,} patches of {spec.patch_size} px at {spec.target_mpp:g} µm/px "
                 f"({grid.patch_size_level0} px at level 0) on {tissue.tissue_fraction:.0%} "
                 "tissue. Compute embeddings to embed them.")  # fmt: skip
        self.progress.setMaximum(max(len(grid), 1))
        self.progress.setValue(0)

    # ================================================================== embed run
    def compute(self) -> Any:
        """Start (or resume) embedding the current slide; a finished store loads instantly."""
        if self.worker is not None:
            return self.worker
        layer, slide = self._checked_slide()
        card = self._checked_card() if layer is not None else None
        if card is None:
            return None
        from ..tiles import TissueParams

        job = _workers.EmbedJob(
            slide=slide, model=card.name, spec=self.spec(), tissue_params=TissueParams(),
            out_dir=self.out_dir(), device=self.device_combo.currentText(),
            allow_random=self.random_check.isChecked(),
            batch_size=getattr(self, "batch_size", None),
            num_workers=getattr(self, "num_workers", None),
        )  # fmt: skip
        self._run_layer = layer.name
        self._outcome = "error"
        self._set_running(True)
        self.say(f"Embedding {layer.name} with {card.name}…")
        self.worker = _workers.start_embed_worker(
            job,
            yielded=self._on_progress,
            returned=self._on_embedded,
            errored=self._on_error,
            aborted=self._on_aborted,
            finished=self._on_finished,
        )
        return self.worker

    def cancel(self) -> None:
        if self.worker is not None:
            self._cancel_t = time.perf_counter()
            self.say("Cancelling after the current batch…")
            self.worker.quit()

    def _set_running(self, running: bool) -> None:
        self.compute_button.setEnabled(not running)
        self.preview_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _on_progress(self, p) -> None:
        if isinstance(p, _workers.StoreLoaded):
            self.say(f"Found a finished feature file with the same recipe: {p.path}")
            return
        self.last_progress = p
        self.progress.setMaximum(max(p.total, 1))
        self.progress.setValue(p.done)
        if p.status == "started" and p.done:
            self.say(f"Resuming at {p.done:,} / {p.total:,} patches…")
        elif p.status == "running":
            self.say(f"{p.done:,} / {p.total:,} patches · {p.rate:.1f} patches/s · "
                     f"{_fmt_time(p.eta_s)} left")  # fmt: skip

    def _on_embedded(self, result) -> None:
        store = result.store
        session = self.explorer.add(self.viewer.layers[self._run_layer], store, result.index)
        self._outcome = "loaded" if self.last_progress is None else "done"
        self.say(f"{session.n:,} patch embeddings ({store.embed_dim}-d, {store.model}) ready: "
                 f"{store.path}")  # fmt: skip
        self.progress.setMaximum(max(session.n, 1))
        self.progress.setValue(session.n)
        self._refresh_results()

    def _on_error(self, exc: Exception) -> None:
        from ..slide import MissingMppError

        if isinstance(exc, MissingMppError):
            self.say(MISSING_MPP.format(name=self._run_layer), True)
        else:
            self.say(f"{type(exc).__name__}: {exc}", True)

    def _on_aborted(self) -> None:
        self._outcome = "cancelled"

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)
        if self._outcome == "cancelled":
            p = self.last_progress
            done = f"{p.done:,} / {p.total:,} patches saved; " if p is not None else ""
            waited = time.perf_counter() - (self._cancel_t or time.perf_counter())
            self.cancel_latency_s = waited
            self.say(f"Cancelled ({done}Compute again to resume).")
        self.last_progress = None
        self.run_finished.emit(self._outcome)

    # ================================================================== results
    def session(self):
        name = self.layer_combo.currentText()
        return self.explorer.sessions.get(name)

    def _require_session(self):
        s = self.session()
        if s is None:
            self.say("Compute (or load) embeddings for this slide first.", True)
        return s

    def cluster(self, k: int | None = None) -> Any:
        s = self._require_session()
        if s is None:
            return None
        from ..analyses.clusters import kmeans

        k = int(k or self.k_spin.value())
        self.say(f"Clustering {s.n:,} patches into {k}…")
        w = _workers.start_function_worker(
            kmeans, s.features, k,
            returned=lambda res: self._on_clustered(s.name, res),
            errored=lambda e: self.say(f"Clustering failed: {e}", True),
        )  # fmt: skip
        self._keep(w)
        return w

    def _on_clustered(self, name: str, res) -> None:
        self.explorer.set_clusters(name, res)
        self.explorer.show_clusters(name)
        self.say(f"{name}: {int(res.labels.max()) + 1} clusters ({res.method} k-means).")

    def _refresh_results(self, event=None) -> None:
        s = self.session()
        rows = s.cluster_rows() if s is not None else []
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
        s = self.session()
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
        return self.explorer.show_heatmap(s.name, key, colormap=self.cmap_combo.currentText(),
                                          opacity=self.opacity_spin.value())  # fmt: skip

    # ================================================================== similarity
    def _session_at(self, world) -> tuple[Any, int]:
        """The session and patch under a world point: the current slide first, then the other
        visible slides with embeddings, top layer first."""
        order = [self.session()] + [
            self.explorer.sessions.get(la.name) for la in reversed(self.viewer.layers)
            if la.visible
        ]  # fmt: skip
        for s in order:
            if s is not None:
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
        return self.query(s.name, [i])

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
        return self.query(s.name, idx)

    def attach_stores(self, model: str | None) -> list[str]:
        """Load finished stores of ``model`` for open slides that have none loaded yet (from
        the output folder), so similarity reaches every open slide embedded by that model."""
        from ..embeddings import StoreError, open_store, store_path

        added = []
        for layer in self.slide_layers():
            if layer.name in self.explorer.sessions or model is None:
                continue
            path = store_path(self.out_dir(), model, layer_slide(layer).name)
            if path.exists():
                try:
                    self.explorer.add(layer, open_store(path))
                    added.append(layer.name)
                except (StoreError, ValueError):
                    continue
        return added

    def query(self, name: str, indices) -> Any:
        t0 = time.perf_counter()
        self.attach_stores(self.explorer.get(name).model)
        res = self.explorer.similarity(name, indices, k=self.topk_spin.value())
        self.explorer.show_similarity(res)
        self.last_result = res
        self._fill_hits(res)
        n_slides = len(res.scores)
        self.say(f"Similarity to {len(res.query)} patch(es) of {name} on {n_slides} slide(s) "
                 f"in {1000 * (time.perf_counter() - t0):.0f} ms.")  # fmt: skip
        return res

    def _fill_hits(self, res) -> None:
        self.hits_table.setRowCount(len(res.hits))
        for r, (name, idx, score) in enumerate(res.hits):
            for c, text in enumerate((name, str(idx), f"{score:.4f}")):
                self.hits_table.setItem(r, c, QTableWidgetItem(text))

    def go_to_hit(self, row: int) -> None:
        """Centre the camera on the row's patch, a few patch widths across the canvas."""
        if self.last_result is None or not 0 <= row < len(self.last_result.hits):
            return
        name, idx, _ = self.last_result.hits[row]
        s = self.explorer.sessions[name]
        canvas = tuple(self.viewer.canvas.size)
        centre, zoom = convert.camera_for_patch(s.coords[idx], s.patch_size_level0, s.mpp,
                                                canvas, offset=s.offset)  # fmt: skip
        camera = self.viewer.scene.camera
        camera.center = centre
        camera.zoom = zoom
        if name in self.viewer.layers:
            self.viewer.layers[name].visible = True

    # ---- mouse -------------------------------------------------------------------------
    def _on_mouse_drag(self, viewer, event):
        """A click (press and release without moving) queries; a drag pans as usual."""
        if not self.click_check.isChecked() or not self.explorer.sessions:
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
        if not self.explorer.sessions:
            return
        s, i = self._session_at(event.position)
        now = (s.name, i) if s is not None else None
        if now != getattr(self, "_hovering", None):
            self._hovering = now
            self.explorer.hover(s.name if s is not None else "", i)

    # ================================================================== export
    def export(self, what=("png", "table", "geojson")) -> list[Path]:
        s = self._require_session()
        if s is None:
            return []
        out = self.out_dir() / "exports"
        try:
            files = s.export(out, what)
        except Exception as e:  # shown, not raised: the user picks another folder
            self.say(f"Export failed: {e}", True)
            return []
        self.say(f"Wrote {len(files)} file(s) to {out}: " + ", ".join(p.name for p in files))
        return files

    # ================================================================== misc
    def _keep(self, worker) -> None:
        self._busy.append(worker)
        worker.finished.connect(lambda: self._busy.remove(worker) if worker in self._busy else None)
