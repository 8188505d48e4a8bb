"""Embedding plot dock: PCA (always) or UMAP (with umap-learn) of a slide's patch embeddings.

Drawn with vispy, which napari already depends on (no matplotlib or pyqtgraph needed): one
``Markers`` visual holds every point on the GPU, so pan/zoom stays smooth at 100,000 points.
The plot has labelled axes (PC1/PC2 or UMAP1/UMAP2, ticks following pan and zoom), fills the
dock as it resizes, and a legend names the cluster colours (the palette of the cluster Labels
layer). Box or lasso selection (``skimage.measure.points_in_poly``, a napari dependency)
highlights the selected patches on the slide and shows them as a tile gallery (a click centres
the viewer on one); the patch under the mouse on the slide is ringed in the plot.

UMAP can take a minute on a large slide: the PCA is shown first (seconds), then replaced by
the UMAP when it is done, with a stage message meanwhile.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..layers import convert
from ..layers.gallery import selection_tiles
from ..layers.session import session_for
from ._jobs import JobPanel
from .gallery import SwatchLegend, TileGallery, centre_on_patch
from .gpfm_widget import fill_slide_combo

MODES = ("pan/zoom", "box select", "lasso select")
GREY = np.array([0.75, 0.75, 0.75, 1.0])
AXES = {"pca": ("PC1", "PC2"), "umap": ("UMAP1", "UMAP2")}
UMAP_FIT = 5_000  # patches UMAP is fitted on (analyses.clusters.umap's fit_size)
GALLERY_MAX = 50  # selected patches shown as tiles
TEXT = "#d6d6d6"
LINES = "#8a8d93"


def umap_message(n: int) -> str:
    """The stage message while UMAP runs."""
    if n > UMAP_FIT:
        return f"UMAP: fitting on {UMAP_FIT:,} patches, then placing all {n:,}…"
    return f"UMAP: fitting on {n:,} patches…"


def _retitled(gen: Generator, message: str) -> Generator:
    """Re-yield a job's records with ``message`` on the first one; returns its result."""
    first = True
    try:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                return stop.value
            yield p.with_(message=message) if first else p
            first = False
    finally:
        gen.close()


#: what tick labels and axis titles are made of (rendered once when the dock opens)
GLYPHS = "UMAP PC 0123456789 .-−+e"


def _share_glyphs(*axes: Any) -> None:
    """One glyph atlas for every text of the plot's axes: vispy gives each text visual its own,
    so each tick-label and title visual rendered (on the CPU) every glyph it met again, on the
    main thread, the first time a plot showed it. The plot's visuals share one GL context, so
    sharing is safe there."""
    from vispy.visuals.text.text import FontManager

    fonts = FontManager(method="cpu")
    for axis in axes:
        for text in (axis._text, axis._axis_label_vis):
            text._font_manager = fonts
            text._update_font()


class EmbeddingPlotWidget(QWidget):
    """Dock widget; ``napari_viewer`` is injected by napari."""

    def __init__(self, napari_viewer):
        super().__init__()
        from vispy import scene

        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.uid: int | None = None
        self.xy: np.ndarray | None = None
        self.method: str | None = None
        self._then: tuple[int, str] | None = None
        self._gallery_of: tuple | None = None
        self.hover_index = -1
        self._drag: list[np.ndarray] = []
        self._warmed = False

        self.slide_combo = QComboBox()
        self.method_combo = QComboBox()
        self.method_combo.addItem("PCA", "pca")
        from ..analyses.clusters import umap_available

        if umap_available():
            self.method_combo.addItem("UMAP (fit on 5,000, applied to all)", "umap")
        self.plot_button = QPushButton("Plot")
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(MODES)
        self.clear_button = QPushButton("Clear selection")
        self.jobs = JobPanel("Embedding plot", self.session, [self.plot_button])
        self.status = self.jobs.status
        self.jobs.say("Compute embeddings in the GPFM dock, then Plot.")

        self.canvas = scene.SceneCanvas(keys=None, show=False, bgcolor="#262930", size=(360, 360))
        self.canvas.native.setMinimumSize(240, 220)
        self.canvas.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                         QSizePolicy.Policy.Expanding)  # fmt: skip
        grid = self.canvas.central_widget.add_grid(spacing=0, margin=4)
        style = {"axis_color": LINES, "tick_color": LINES, "text_color": TEXT,
                 "tick_font_size": 7, "axis_font_size": 9, "axis_width": 1, "tick_width": 1,
                 "major_tick_length": 5, "minor_tick_length": 2}
        self.yaxis = scene.AxisWidget(orientation="left", axis_label="PC2", tick_label_margin=3,
                                      axis_label_margin=36, **style)  # fmt: skip
        self.yaxis.width_max = 52
        self.xaxis = scene.AxisWidget(orientation="bottom", axis_label="PC1",
                                      tick_label_margin=12, axis_label_margin=26,
                                      **style)  # fmt: skip
        self.xaxis.height_max = 40
        grid.add_widget(self.yaxis, row=0, col=0)
        grid.add_widget(self.xaxis, row=1, col=1)
        corner = grid.add_widget(row=1, col=0)
        corner.width_max, corner.height_max = 52, 40
        self.view = grid.add_view(row=0, col=1)
        self.view.camera = scene.PanZoomCamera()  # fills the plot area (axes give the scale)
        self.xaxis.link_view(self.view)
        self.yaxis.link_view(self.view)
        _share_glyphs(self.xaxis.axis, self.yaxis.axis)
        self._show_axes(False)  # nothing to draw before the first plot
        self.legend = SwatchLegend()
        self.legend.setToolTip("Point colours: clusters, as on the slide's cluster map.")
        self.gallery_label = QLabel("")
        self.gallery_label.setWordWrap(True)
        self.gallery = TileGallery(self.session, size=72, rows=1.5)
        self.markers = scene.visuals.Markers(parent=self.view.scene)
        self.selected = scene.visuals.Markers(parent=self.view.scene)
        self.hover = scene.visuals.Markers(parent=self.view.scene)
        self.path = scene.visuals.Line(parent=self.view.scene, color="yellow", width=1.5)
        self.selected.order, self.hover.order, self.path.order = -1, -2, -3
        origin = np.zeros((2, 2), np.float32)  # vispy visuals need data before bounds work
        for vis in (self.markers, self.selected, self.hover):
            vis.set_data(origin[:1], size=1)
        self.path.set_data(origin)
        for vis in (self.markers, self.selected, self.hover, self.path):
            vis.visible = False  # nothing to draw until set_data (an empty draw is a GL error)

        top = QHBoxLayout()
        top.addWidget(self.slide_combo, 2)
        top.addWidget(self.method_combo, 2)
        top.addWidget(self.plot_button, 1)
        mid = QHBoxLayout()
        mid.addWidget(QLabel("Mouse"))
        mid.addWidget(self.mode_combo, 2)
        mid.addWidget(self.clear_button, 1)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addLayout(mid)
        lay.addWidget(self.canvas.native, 1)
        lay.addWidget(self.legend)
        lay.addWidget(self.gallery_label)
        lay.addWidget(self.gallery)
        lay.addWidget(self.jobs)
        self.gallery_label.setVisible(False)

        self.plot_button.clicked.connect(lambda: self.compute())
        self.jobs.finished.connect(self._after_job)
        self.gallery.tile_clicked.connect(
            lambda uid, i: centre_on_patch(self.viewer, self.session, uid, i))
        self.clear_button.clicked.connect(lambda: self.select_indices([]))
        self.mode_combo.currentTextChanged.connect(self._mode_changed)
        self.slide_combo.currentIndexChanged.connect(self._slide_changed)
        self.canvas.events.mouse_press.connect(self._on_press)
        self.canvas.events.mouse_move.connect(self._on_move)
        self.canvas.events.mouse_release.connect(self._on_release)
        ev = self.session.events
        ev.slides.connect(self._sessions_changed)
        ev.store.connect(self._sessions_changed)
        ev.clusters.connect(self._clusters_changed)
        ev.selection.connect(self._selection_changed)
        ev.hover.connect(self._hover_changed)
        self._sessions_changed()

    # ================================================================== first draw
    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt name
        super().showEvent(event)
        if not self._warmed:
            self._warmed = True
            from qtpy.QtCore import QTimer

            QTimer.singleShot(0, self.warm_draw)

    def warm_draw(self) -> None:
        """Draw every visual once, off screen, when the dock is first shown: the first draw of
        the plot compiles its shaders and renders the axes' glyphs (seconds on a loaded
        software-OpenGL machine), which otherwise froze the window when the first PCA arrived.
        Nothing of it stays on screen."""
        if self.xy is not None:
            return
        pts = np.array([[-1.5, -0.25], [0.75, 1.0]], np.float32)
        labels = self.axis_labels
        # every glyph axes can show, rendered once into the plot's shared glyph atlas
        self.xaxis.axis.axis_label, self.yaxis.axis.axis_label = GLYPHS, "UMAP2 PC1"
        self._show_axes(True)
        for vis in (self.markers, self.selected, self.hover):
            vis.set_data(pts, face_color=(1, 1, 0, 1), edge_color="white", edge_width=1, size=6)
            vis.visible = True
        self.path.set_data(pts)
        self.path.visible = True
        self.view.camera.set_range(x=(-2.0, 1.0), y=(-0.5, 1.5))
        try:
            self.canvas.render()
        except Exception:  # noqa: BLE001 - an optimisation only: the first plot draws it then
            pass
        finally:
            if self.xy is None:
                self.xaxis.axis.axis_label, self.yaxis.axis.axis_label = labels
                self._show_axes(False)
                for vis in (self.markers, self.selected, self.hover, self.path):
                    vis.visible = False
                self.canvas.update()

    # ================================================================== data
    def _sessions_changed(self, event=None) -> None:
        before = self.slide_combo.currentData()
        fill_slide_combo(self.slide_combo, self.session, only_embedded=True)
        if event is not None and event.type == "store" and before is None:
            i = self.slide_combo.findData(event.value)
            if i >= 0:
                self.slide_combo.setCurrentIndex(i)
        if self.uid is not None and self.uid not in self.session.slides:
            self._clear()
        elif self.uid is not None and event is not None and event.type == "store" \
                and event.value == self.uid:
            self._clear()  # a new store for the plotted slide: the old points are stale

    def _clear(self) -> None:
        self.uid, self.xy, self.method = None, None, None
        self.markers.visible = self.selected.visible = self.hover.visible = False
        self._show_axes(False)
        self.legend.set_entries([])
        self._show_gallery(None, np.empty(0, np.int64))
        self.canvas.update()

    def _slide_changed(self, _index: int = -1) -> None:
        s = self.session.slides.get(self.slide_combo.currentData())
        if s is not None and s.projections:
            method = "umap" if "umap" in s.projections else next(iter(s.projections))
            self.set_data(s.uid, s.projections[method], method)

    def _show_axes(self, visible: bool) -> None:
        self.xaxis.visible = self.yaxis.visible = visible
        self.view.border_color = LINES if visible else None

    @property
    def axis_labels(self) -> tuple[str, str]:
        """The (x, y) axis titles drawn on the plot."""
        return (self.xaxis.axis.axis_label, self.yaxis.axis.axis_label)

    @property
    def name(self) -> str | None:
        """Layer name of the plotted slide."""
        s = self.session.slides.get(self.uid)
        return None if s is None else s.name

    def compute(self, method: str | None = None, uid: int | None = None,
                pca_first: bool = True) -> Any:  # fmt: skip
        """Project the chosen slide's embeddings in a worker, then plot them (UMAP: the PCA
        first, replaced by the UMAP when done). Returns the worker of the first job."""
        s = self.session.slides.get(self.slide_combo.currentData() if uid is None else uid)
        if s is None or not s.has_store:
            self.jobs.say("No embeddings loaded: use Compute embeddings in the GPFM dock.", True)
            return None
        from ..jobs.projection import projection_job

        method = method or self.method_combo.currentData() or "pca"
        uid = s.uid
        if method == "umap" and "umap" not in s.projections and pca_first:
            # UMAP takes long: PCA first (seconds), replaced by the UMAP when it is done
            self._then = (uid, "umap")
            return self.jobs.run(projection_job(s, "pca"), slide=uid,
                                 on_result=lambda xy: self.set_data(uid, xy, "pca"),
                                 message=f"PCA of {s.n:,} patches first (UMAP follows)…")
        if method == "umap":
            return self.jobs.run(_retitled(projection_job(s, "umap"), umap_message(s.n)),
                                 slide=uid, on_result=lambda xy: self.set_data(uid, xy, "umap"),
                                 message=umap_message(s.n))  # fmt: skip
        return self.jobs.run(projection_job(s, method), slide=uid,
                             on_result=lambda xy: self.set_data(uid, xy, method),
                             message=f"{method.upper()} of {s.n:,} patches…")  # fmt: skip

    def _after_job(self, outcome: str) -> None:
        then, self._then = self._then, None
        if then is None or outcome != "done" or then[0] not in self.session.slides:
            return
        uid, method = then
        self.compute(method, uid, pca_first=False)  # the PCA stays on screen meanwhile

    def colours(self) -> np.ndarray:
        s = self.session.slides.get(self.uid)
        n = 0 if self.xy is None else len(self.xy)
        if s is None or s.clusters is None:
            return np.tile(GREY, (n, 1))
        k = int(s.clusters.labels.max()) + 1
        return convert.cluster_colours(k)[s.clusters.labels]

    def set_data(self, uid: int, xy: np.ndarray, method: str = "pca") -> None:
        """Show (N, 2) ``method`` coordinates of slide ``uid``'s patches (main thread)."""
        if uid not in self.session.slides:
            return
        self.uid = uid
        self.method = method
        name = self.name
        self.xy = np.asarray(xy, dtype=np.float32)
        size = 6 if len(self.xy) < 5_000 else 3
        self.markers.set_data(self.xy, face_color=self.colours(), edge_width=0, size=size)
        self.markers.visible = True
        xl, yl = AXES.get(method, (f"{method} 1", f"{method} 2"))
        self.xaxis.axis.axis_label, self.yaxis.axis.axis_label = xl, yl
        self._show_axes(True)
        self._update_legend()
        lo, hi = self.xy.min(0), self.xy.max(0)
        pad = 0.05 * np.maximum(hi - lo, 1e-6)
        self.view.camera.set_range(x=(lo[0] - pad[0], hi[0] + pad[0]),
                                   y=(lo[1] - pad[1], hi[1] + pad[1]))  # fmt: skip
        self._selection_changed()
        self.status.setText(f"{name}: {xl}/{yl} of {len(self.xy):,} patches. Choose box or "
                            "lasso select to highlight patches on the slide.")  # fmt: skip
        self.canvas.update()

    def _update_legend(self) -> None:
        s = self.session.slides.get(self.uid)
        if s is None or s.clusters is None or self.xy is None:
            self.legend.set_entries([("not clustered (cluster in the GPFM dock)", GREY)]
                                    if self.xy is not None else [])  # fmt: skip
            return
        counts = np.bincount(s.clusters.labels, minlength=int(s.clusters.labels.max()) + 1)
        self.legend.set_entries([(f"{n} ({counts[i]:,})", c) for i, (n, c) in
                                 enumerate(convert.cluster_legend(len(counts)))])  # fmt: skip

    def _clusters_changed(self, event=None) -> None:
        if self.xy is not None and event is not None and event.value == self.uid:
            self.markers.set_data(self.xy, face_color=self.colours(), edge_width=0,
                                  size=6 if len(self.xy) < 5_000 else 3)  # fmt: skip
            self._update_legend()

    # ================================================================== selection
    def select_indices(self, indices) -> None:
        """Select these patches of the plotted slide and highlight them on the slide."""
        if self.uid is None:
            return
        self.session.select(self.uid, np.asarray(indices, dtype=np.int64))
        self.session.show_selection(self.uid)

    def select_box(self, p0, p1) -> np.ndarray:
        """Select the points inside the rectangle with corners ``p0``, ``p1`` (plot coords)."""
        lo, hi = np.minimum(p0, p1), np.maximum(p0, p1)
        inside = np.all((self.xy >= lo) & (self.xy <= hi), axis=1)
        idx = np.flatnonzero(inside)
        self.select_indices(idx)
        return idx

    def select_polygon(self, polygon) -> np.ndarray:
        """Select the points inside a lasso polygon (M, 2) in plot coordinates."""
        from skimage.measure import points_in_poly

        poly = np.asarray(polygon, dtype=np.float64)
        if len(poly) < 3:
            return np.empty(0, np.int64)
        lo, hi = poly.min(0), poly.max(0)
        cand = np.flatnonzero(np.all((self.xy >= lo) & (self.xy <= hi), axis=1))
        idx = cand[points_in_poly(self.xy[cand].astype(np.float64), poly)]
        self.select_indices(idx)
        return idx

    def _selection_changed(self, event=None) -> None:
        s = self.session.slides.get(self.uid)
        if self.xy is None or s is None or len(s.selection) != len(self.xy):
            self.selected.visible = False
            return
        idx = np.flatnonzero(s.selection)
        self.selected.visible = bool(idx.size)
        if idx.size:
            self.selected.set_data(self.xy[idx], face_color=(1, 1, 0, 1), edge_color="black",
                                   edge_width=0.5, size=7)  # fmt: skip
        self.status.setText(f"{self.name}: {idx.size:,} of {len(self.xy):,} patches selected.")
        self._show_gallery(s, idx)

    def _show_gallery(self, s, idx: np.ndarray) -> None:
        """The selected patches as tiles (a sample of :data:`GALLERY_MAX` when more)."""
        key = None if s is None or not idx.size else (s.uid, len(idx), hash(idx.tobytes()))
        if key == self._gallery_of:
            return
        self._gallery_of = key
        tiles = [] if key is None else selection_tiles(s, idx, GALLERY_MAX)
        self.gallery.set_tiles(tiles)
        shown = "" if len(tiles) == len(idx) else f" ({len(tiles)} of them, sampled)"
        self.gallery_label.setText(f"Selected patches{shown}: click one to go there.")
        self.gallery_label.setVisible(bool(tiles))

    # ================================================================== hover
    def _hover_changed(self, event) -> None:
        uid, index = event.value
        if self.xy is None or uid != self.uid or not 0 <= index < len(self.xy):
            self.hover.visible = False
            self.hover_index = -1
        else:
            self.hover_index = int(index)
            self.hover.set_data(self.xy[index : index + 1], face_color=(0, 0, 0, 0),
                                edge_color="white", edge_width=2, size=16)  # fmt: skip
            self.hover.visible = True
        self.canvas.update()

    # ================================================================== mouse
    def to_plot(self, pos) -> np.ndarray:
        """Canvas pixel position -> plot coordinates."""
        tr = self.canvas.scene.node_transform(self.view.scene)
        return np.asarray(tr.map(np.asarray(pos, dtype=float)[:2]))[:2]

    def _mode_changed(self, mode: str) -> None:
        self.view.camera.interactive = mode == MODES[0]

    def _on_press(self, event) -> None:
        if self.xy is None or self.mode_combo.currentText() == MODES[0]:
            return
        self._drag = [self.to_plot(event.pos)]

    def _on_move(self, event) -> None:
        if not self._drag:  # only between a press and a release in a select mode
            return
        p = self.to_plot(event.pos)
        if self.mode_combo.currentText() == MODES[1]:
            a = self._drag[0]
            self._drag = [a, p]
            line = np.array([a, [p[0], a[1]], p, [a[0], p[1]], a])
        else:
            self._drag.append(p)
            line = np.array(self._drag + [self._drag[0]])
        self.path.set_data(line.astype(np.float32))
        self.path.visible = True

    def _on_release(self, event) -> None:
        if not self._drag:
            return
        drag, self._drag = self._drag, []
        self.path.visible = False
        if self.mode_combo.currentText() == MODES[1] and len(drag) == 2:
            self.select_box(drag[0], drag[1])
        elif len(drag) >= 3:
            self.select_polygon(np.array(drag))
        self.canvas.update()
