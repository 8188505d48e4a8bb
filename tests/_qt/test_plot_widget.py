"""The embedding plot dock: selection in the plot selects patches on the slide, and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_gpfm.embeddings.store import FeatureStore
from napari_gpfm.layers.session import SlideSession, explorer_for

MPP = 0.5


def _session(n_side=40, dim=32, seed=0) -> SlideSession:
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    coords = np.stack([xs.ravel() * 224, ys.ravel() * 224], 1).astype(np.int64)
    lab = rng.integers(0, 3, len(coords))
    feats = (rng.normal(size=(3, dim))[lab] * 4 + rng.normal(size=(len(coords), dim)))
    attrs = {"gpfm_model": "m", "gpfm_mpp": MPP, "patch_size_level0": 224, "name": "s"}
    store = FeatureStore(Path("s.h5"), "gpfm", coords, attrs, _features=feats.astype(np.float32))
    return SlideSession("s", None, store)


@pytest.fixture
def plot(make_napari_viewer, qtbot):
    from napari_gpfm._qt.plot_widget import EmbeddingPlotWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 8)), name="s", scale=(MPP, MPP))  # stands for the slide
    widget = EmbeddingPlotWidget(viewer)
    explorer = explorer_for(viewer)
    explorer.sessions["s"] = _session()
    explorer.events.sessions(value="s")
    explorer.cluster("s", 3)
    return viewer, widget, explorer


def test_pca_plot_and_box_lasso_selection(plot, qtbot):
    viewer, w, ex = plot
    assert w.slide_combo.currentText() == "s"
    # the worker starts at once and can finish before a signal blocker connects: wait for the
    # plotted data instead
    assert w.compute("pca") is not None
    qtbot.waitUntil(lambda: w.xy is not None and not w._busy, timeout=20_000)
    s = ex.sessions["s"]
    assert w.xy.shape == (s.n, 2)
    # points are coloured by cluster with the Labels palette
    from napari_gpfm.layers.convert import cluster_colours

    np.testing.assert_allclose(w.colours(), cluster_colours(3)[s.clusters.labels])

    # box selection -> exactly the points inside -> highlighted patches on the slide
    lo, hi = np.percentile(w.xy, 20, axis=0), np.percentile(w.xy, 60, axis=0)
    idx = w.select_box(lo, hi)
    want = np.flatnonzero(np.all((w.xy >= lo) & (w.xy <= hi), axis=1))
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(np.flatnonzero(s.selection), want)
    layer = viewer.layers["s selection"]
    assert (layer.data > 0).sum() == want.size
    # the highlighted cells are those of the selected patches
    g = s.grid
    assert np.all(layer.data[g.rows[want], g.cols[want]] > 0)

    # lasso through simulated mouse drags on the vispy canvas
    w.mode_combo.setCurrentText("lasso select")
    c = w.xy.mean(0)
    r = 0.5 * w.xy.std(0)
    poly = np.array([[c[0] - r[0], c[1] - r[1]], [c[0] + r[0], c[1] - r[1]],
                     [c[0] + r[0], c[1] + r[1]], [c[0] - r[0], c[1] + r[1]]])  # fmt: skip
    tr = w.canvas.scene.node_transform(w.view.scene).inverse
    px = [np.asarray(tr.map(p))[:2] for p in poly]
    canvas = w.canvas
    canvas.events.mouse_press(pos=px[0], button=1)
    for p in px[1:]:
        canvas.events.mouse_move(pos=p, button=1)
    assert w.path.visible  # the lasso is drawn while dragging
    canvas.events.mouse_release(pos=px[-1], button=1)
    inside = np.all(np.abs(w.xy - c) <= r * 0.999, axis=1)
    sel = s.selection
    assert sel[inside].all() and sel.sum() <= np.all(np.abs(w.xy - c) <= r * 1.001, axis=1).sum()


def test_hover_on_slide_rings_the_point(plot, qtbot):
    viewer, w, ex = plot
    # the worker starts at once and can finish before a signal blocker connects: wait for the
    # plotted data instead
    assert w.compute("pca") is not None
    qtbot.waitUntil(lambda: w.xy is not None and not w._busy, timeout=20_000)
    s = ex.sessions["s"]
    ex.hover("s", 17)
    assert w.hover_index == 17 and w.hover.visible
    ex.hover("s", -1)
    assert w.hover_index == -1 and not w.hover.visible
    # the GPFM dock's mouse-move callback drives the same event from a world position
    from napari_gpfm._qt.gpfm_widget import GPFMWidget

    dock = GPFMWidget(viewer)

    class Ev:
        position = s.centre(33)

    dock._on_mouse_move(viewer, Ev())
    assert w.hover_index == 33
