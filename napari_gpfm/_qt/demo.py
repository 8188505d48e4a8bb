"""``napari-gpfm demo``: the main job on the bundled sample slide, driven through the docks.

Opens napari with the sample slide (``viewer.open``) and the "GPFM", "Embedding plot" and
"Annotate and classify" docks (added through napari's plugin path, as the Plugins menu does, so
they share the window's one session), then: computes the
embeddings with the default model (``default_model_name()``), clusters them (k = 4), shows the
cluster map, the distance-to-centre heatmap and a similarity query from the most typical
patch of the largest cluster, and plots the PCA of the embeddings. ``--headless`` renders on a
private Xvfb display, writes a screenshot and the feature store into ``--out``, and exits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..layers.session import result_name

DEMO_TIMEOUT_S = 600
DEMO_CLASSES = ("Demo class A", "Demo class B")


class DemoFlow:
    """Chains embed → cluster → heatmaps → similarity → plot on the main thread via signals."""

    def __init__(self, viewer, dock, plot, k: int = 4):
        self.viewer, self.dock, self.plot, self.k = viewer, dock, plot, k
        self.done = False
        self.error: str | None = None
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self.dock.run_finished.connect(self._embedded)
        if self.dock.compute() is None:
            self._fail(self.dock.status.text())

    def _fail(self, message: str) -> None:
        self.error = message
        self.done = True

    def _mark(self, step: str) -> None:
        self.timings[step] = time.perf_counter() - self._t0

    def _embedded(self, outcome: str) -> None:
        self.dock.run_finished.disconnect(self._embedded)
        if outcome not in ("done", "loaded"):
            return self._fail(self.dock.status.text())
        self._mark("embeddings")
        worker = self.dock.cluster(self.k)
        worker.returned.connect(lambda _res: self._clustered())
        worker.errored.connect(lambda e: self._fail(f"clustering failed: {e}"))

    def _clustered(self) -> None:
        self._mark("clusters")
        dock, s = self.dock, self.dock.session_state()
        dock.show_heatmap("distance_to_centre").visible = False
        # query: the most typical patch (closest to its centre) of the largest cluster
        labels, dist = s.clusters.labels, s.clusters.distances
        query = int(np.flatnonzero(labels == 0)[np.argmin(dist[labels == 0])])
        dock.handle_click(s.centre(query))
        self._mark("similarity")
        clusters = self.viewer.layers[result_name(s.name, "clusters")]
        clusters.opacity = 0.45
        clusters.visible = False
        self.viewer.layers.selection.active = self.viewer.layers[result_name(s.name, "similarity")]
        worker = self.plot.compute("pca")
        worker.returned.connect(lambda _xy: self._plotted())
        worker.errored.connect(lambda e: self._fail(f"PCA failed: {e}"))

    def _plotted(self) -> None:
        self._mark("plot")
        self.dock.dock_widgets[2].raise_()  # the Annotate tab: it sees the same store
        self._annotate()

    def _annotate(self) -> None:
        """Two demo classes, each annotated with squares on the most typical patches of one of
        the two largest clusters (a stand-in for a pathologist's strokes), then the live probe:
        the Annotate dock trains on the store the GPFM dock computed and paints a class map."""
        ann, s = self.dock.annotate, self.dock.session_state()
        labels, dist = s.clusters.labels, s.clusters.distances
        largest = np.argsort(-np.bincount(labels))[:2]
        shapes = ann.new_annotation_layer()
        P = s.patch_size_level0
        for name, c in zip(DEMO_CLASSES, largest):
            ann.add_class(name)
            ann.set_active_class(name)
            members = np.flatnonzero(labels == c)
            for i in members[np.argsort(dist[members])][:4]:
                x, y = s.coords[i]
                shapes.add_rectangles(np.array([[y, x], [y + P - 1, x + P - 1]], float))
        ann.jobs.finished.connect(self._classified)
        ann.retrain()

    def _classified(self, outcome: str) -> None:
        self.dock.annotate.jobs.finished.disconnect(self._classified)
        if outcome != "done":
            return self._fail(f"the linear probe did not train: {self.dock.annotate.status_label.text()}")
        self._mark("classifier")
        s = self.dock.session_state()
        for la in self.viewer.layers:
            meta = la.metadata.get("napari_gpfm", {})
            if meta.get("slide_uid") == s.uid and meta.get("kind") == "class-map":
                la.opacity = 0.45
                la.visible = False  # the similarity heatmap stays in front in the screenshot
        self.viewer.layers.selection.active = self.viewer.layers[result_name(s.name, "similarity")]
        self.done = True


def build(viewer, model: str, allow_random: bool = False, out: Path | None = None,
          slide_paths: list[Path] | None = None, mpp: float | None = None):  # fmt: skip
    """Open the slides and add the docks through napari's plugin path; returns ``(dock, plot)``
    (the GPFM dock and the embedding plot; the Annotate dock is ``dock.annotate``)."""
    from .._resources import sample_slide_path
    from ..layers.reader import set_layer_mpp

    for path in slide_paths or [sample_slide_path()]:
        for layer in viewer.open(str(path), plugin="napari-gpfm"):
            if mpp is not None:
                set_layer_mpp(layer, mpp)
    add = viewer.window.add_plugin_dock_widget
    dw1, dock = add("napari-gpfm", "GPFM")
    dw2, plot = add("napari-gpfm", "Embedding plot")
    dw3, annotate = add("napari-gpfm", "Annotate and classify")
    dock.annotate = annotate
    dock.random_check.setChecked(allow_random)
    dock.set_model(model)
    if out is not None:
        dock.out_edit.setText(str(out))
        dock.session.set_out_dir(out)
    from qtpy.QtCore import Qt

    qt_window = viewer.window._qt_window
    qt_window.tabifyDockWidget(dw1, dw3)  # GPFM and Annotate share the top, the plot below
    dock.dock_widgets = (dw1, dw2, dw3)
    qt_window.resizeDocks([dw1, dw2], [560, 420], Qt.Orientation.Vertical)
    qt_window.resizeDocks([dw1], [480], Qt.Orientation.Horizontal)
    viewer.scale_bar.visible = True
    return dock, plot


def run_flow(flow: DemoFlow, timeout_s: float = DEMO_TIMEOUT_S) -> None:
    """Start the flow and process events until it ends (headless use)."""
    from qtpy.QtWidgets import QApplication

    flow.start()
    t_end = time.perf_counter() + timeout_s
    while not flow.done and time.perf_counter() < t_end:
        QApplication.processEvents()
        time.sleep(0.01)
    if not flow.done:
        flow._fail(f"the demo did not finish within {timeout_s:.0f} s")
    for _ in range(20):  # let the last layers and the plot draw
        QApplication.processEvents()
        time.sleep(0.05)
    flow.viewer.screenshot(canvas_only=False)  # one draw puts the overlays (colour bar, scale bar)
    QApplication.processEvents()


def write_doc_images(viewer, dock, out_dir: Path) -> list[Path]:
    """``demo.png`` (the whole flow), ``heatmap_zoom.png`` (a corner where four patches meet,
    the similarity heatmap half transparent over the tissue) and ``heatmap_pixel_zoom.png``
    (the same corner zoomed until slide pixels show, the first pixel of the lower-right patch
    marked), so cell edges can be checked against the tissue and the pixel grid."""
    from qtpy.QtWidgets import QApplication

    from ..layers.convert import camera_for_patch

    out_dir.mkdir(parents=True, exist_ok=True)
    first = out_dir / "demo.png"
    viewer.screenshot(str(first), canvas_only=False)
    s = dock.session_state()
    heat = viewer.layers[result_name(s.name, "similarity")]
    heat.opacity = 0.45
    viewer.layers[result_name(s.name, "top hits")].visible = False
    # the corner shared by four patches whose similarities differ most
    where = {tuple(c): j for j, c in enumerate(s.coords.tolist())}
    P = s.patch_size_level0
    sim = s.values["similarity"]
    best, i = -1.0, 0
    for j, (x, y) in enumerate(s.coords.tolist()):
        quad = [where.get(c) for c in ((x + P, y), (x, y + P), (x + P, y + P))]
        if None not in quad and float(np.std(sim[[j, *quad]])) > best:
            best, i = float(np.std(sim[[j, *quad]])), j
    x, y = s.coords[i]
    cam = viewer.scene.camera
    cam.center = ((y + P - 0.5) * s.mpp, (x + P - 0.5) * s.mpp)  # the shared corner

    def shot(path: Path, patches_across: float) -> Path:
        cam.zoom = camera_for_patch(s.coords[i], P, s.mpp, tuple(viewer.canvas.size),
                                    patches_across)[1]  # fmt: skip
        for _ in range(20):
            QApplication.processEvents()
            time.sleep(0.05)
        viewer.screenshot(str(path), canvas_only=False)
        return path

    second = shot(out_dir / "heatmap_zoom.png", 1.6)
    # the first slide pixel of the lower-right patch, marked: the cells' shared corner must be
    # its top-left corner (pixel-centre convention, ARCHITECTURE.md)
    viewer.add_points([((y + P) * s.mpp, (x + P) * s.mpp)], name="pixel (x+P, y+P)", size=0.12,
                      face_color="cyan", border_width=0, units="micrometer")  # fmt: skip
    viewer.layers.selection.active = heat
    third = shot(out_dir / "heatmap_pixel_zoom.png", 0.12)
    return [first, second, third]


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``napari-gpfm demo``."""
    if args.headless:
        from ._display import ensure_display

        ensure_display()
    from ..encoders import EncoderError, default_model_name

    try:
        model = args.model or default_model_name()
    except EncoderError as e:
        print(f"napari-gpfm demo: {e}")
        return 2
    import napari

    headless = bool(args.headless)
    out = args.out if args.out is not None else (Path("napari_gpfm_out") if headless else None)
    viewer = napari.Viewer(title="napari-gpfm demo", show=not headless)
    viewer.window._qt_window.resize(1600, 1000)
    dock, plot = build(viewer, model, allow_random=args.random_weights, out=out,
                       slide_paths=[Path(s) for s in getattr(args, "slides", []) or []],
                       mpp=args.mpp)  # fmt: skip
    flow = DemoFlow(viewer, dock, plot, k=args.k)
    if not headless:
        flow.start()
        napari.run()
        return 0
    t0 = time.perf_counter()
    run_flow(flow)
    if flow.error:
        print(f"napari-gpfm demo: {flow.error}")
    screenshot = args.screenshot or out / "screenshot.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(screenshot), canvas_only=False)
    if args.docs_images is not None and not flow.error:
        print("docs images:", *write_doc_images(viewer, dock, args.docs_images))
    state = dock.session_state()
    store = state.store.path if state is not None and state.has_store else None
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in flow.timings.items())
    print(f"model: {model}\nstore: {store}\nscreenshot: {screenshot}\n"
          f"timings (cumulative): {steps}; total {time.perf_counter() - t0:.1f} s")  # fmt: skip
    viewer.close()
    return 1 if flow.error else 0
