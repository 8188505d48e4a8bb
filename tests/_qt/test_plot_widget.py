"""The embedding plot dock: selection in the plot selects patches on the slide, and back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_gpfm.embeddings.store import FeatureStore
from napari_gpfm.layers.session import result_name, session_for

P = 224  # patch side at level 0; the synthetic patches tile without overlap


PLANTED = 5  # noise-free patches per group: the group's own direction, nearest its centre


def _store(n_side=40, dim=32, seed=0) -> tuple[FeatureStore, list[np.ndarray]]:
    """A synthetic store: n_side² patches in 3 well-separated groups (a group direction × 4
    plus unit noise), and per group the indices of PLANTED patches without noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    coords = np.stack([xs.ravel() * P, ys.ravel() * P], 1).astype(np.int64)
    lab = rng.integers(0, 3, len(coords))
    means = rng.normal(size=(3, dim)) * 4
    feats = means[lab] + rng.normal(size=(len(coords), dim))
    planted = [np.flatnonzero(lab == g)[:PLANTED] for g in range(3)]
    for g, idx in enumerate(planted):
        feats[idx] = means[g]
    attrs = {"gpfm_model": "m", "gpfm_mpp": 0.5, "patch_size_level0": P, "name": "s"}
    store = FeatureStore(Path("s.h5"), "gpfm", coords, attrs, _features=feats.astype(np.float32))
    return store, planted


@pytest.fixture
def plot(make_napari_viewer, qtbot, sample_svs, tmp_path, monkeypatch):
    """The sample slide opened as layer "s" with a synthetic store attached and clustered
    (k=3); the plot dock added before the store existed."""
    from napari_gpfm._qt.plot_widget import EmbeddingPlotWidget
    from napari_gpfm.analyses.clusters import kmeans

    monkeypatch.setenv("NAPARI_GPFM_FEATURES_DIR", str(tmp_path / "features"))
    viewer = make_napari_viewer()
    shutil.copy(sample_svs, tmp_path / "s.svs")
    (layer,) = viewer.open(str(tmp_path / "s.svs"), plugin="napari-gpfm")
    assert layer.name == "s"
    widget = EmbeddingPlotWidget(viewer)
    assert widget.slide_combo.count() == 0  # nothing embedded yet
    session = session_for(viewer)
    s = session.attach_store(layer, _store()[0])
    session.set_clusters(s.uid, kmeans(s.features, 3))
    return viewer, widget, session, s


@pytest.fixture
def planted() -> list[np.ndarray]:
    """The noise-free patches of each group of the ``plot`` fixture's store (same seed)."""
    return _store()[1]


def _plot_pca(qtbot, w):
    with qtbot.waitSignal(w.jobs.finished, timeout=20_000) as blocker:
        assert w.compute("pca") is not None, w.status.text()
    assert blocker.args == ["done"], w.status.text()


def _centres_world(s, indices):
    """World (y, x) µm of patch centres, from the coords and the slide's pixel size (pixel
    centres at integer coordinates, as napari draws images)."""
    c = s.coords[np.asarray(indices)]
    return (c[:, ::-1] + P / 2 - 0.5) * s.mpp


def test_pca_plot_and_box_lasso_selection(plot, qtbot):
    viewer, w, session, s = plot
    assert w.slide_combo.currentText() == "s"  # picked once the store arrived
    _plot_pca(qtbot, w)
    assert w.uid == s.uid and w.name == "s"
    assert w.xy.shape == (s.n, 2)
    # points are coloured by cluster with the palette of the cluster Labels layer
    labels_layer = session.show_clusters(s.uid)
    assert labels_layer.name == result_name("s", "clusters")
    np.testing.assert_allclose(w.colours(), labels_layer.colormap.map(s.clusters.labels + 1),
                               atol=1e-6)  # fmt: skip
    assert len(np.unique(w.colours(), axis=0)) == 3

    # a box around one point selects that point only; a box around them all selects all
    eps = 1e-4 * np.ptp(w.xy, axis=0)
    np.testing.assert_array_equal(w.select_box(w.xy[17] - eps, w.xy[17] + eps), [17])
    np.testing.assert_array_equal(w.select_box(w.xy.min(0), w.xy.max(0)), np.arange(s.n))

    # box selection -> exactly the points inside -> highlighted patches on the slide
    from skimage.measure import points_in_poly

    lo, hi = np.percentile(w.xy, 20, axis=0), np.percentile(w.xy, 60, axis=0)
    idx = w.select_box(hi, lo)  # corners in any order
    rect = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    want = np.flatnonzero(points_in_poly(w.xy.astype(np.float64), rect))
    assert 0 < want.size < s.n
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(np.flatnonzero(s.selection), want)
    layer = viewer.layers[result_name("s", "selection")]
    assert (layer.data > 0).sum() == want.size
    # the highlighted cells lie under the selected patches' centres, and only there
    cells = np.round(np.array([layer.world_to_data(p) for p in _centres_world(s, np.arange(s.n))]
                              )).astype(int)  # fmt: skip
    on = layer.data[cells[:, 0], cells[:, 1]] > 0
    np.testing.assert_array_equal(np.flatnonzero(on), want)
    assert "selected" in w.status.text() and f"{want.size:,}" in w.status.text()

    # lasso through simulated mouse drags on the vispy canvas
    w.mode_combo.setCurrentText("lasso select")
    group = w.xy[s.clusters.labels == 0]  # around one cluster (the overall mean lies between)
    c = group.mean(0)
    r = 0.5 * group.std(0)
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
    assert not w.path.visible
    inside = np.all(np.abs(w.xy - c) <= r * 0.999, axis=1)
    sel = s.selection
    assert inside.any()
    assert sel[inside].all() and sel.sum() <= np.all(np.abs(w.xy - c) <= r * 1.001, axis=1).sum()
    assert (viewer.layers[result_name("s", "selection")].data > 0).sum() == sel.sum()

    # Clear selection empties both
    w.select_indices([])
    assert not s.selection.any()
    assert not (viewer.layers[result_name("s", "selection")].data > 0).any()


def test_hover_on_slide_rings_the_point(plot, qtbot):
    viewer, w, session, s = plot
    _plot_pca(qtbot, w)
    session.hover(s.uid, 17)
    assert w.hover_index == 17 and w.hover.visible
    session.hover(s.uid, -1)
    assert w.hover_index == -1 and not w.hover.visible
    # the GPFM dock's mouse-move callback drives the same event from a world position
    from napari_gpfm._qt.gpfm_widget import GPFMWidget

    dock = GPFMWidget(viewer)
    assert dock.session is session

    class Ev:
        position = tuple(_centres_world(s, [33])[0])

    dock._on_mouse_move(viewer, Ev())
    assert w.hover_index == 33 and w.hover.visible

    class Off:
        position = (-1000.0, -1000.0)  # off the slide: no patch

    dock._on_mouse_move(viewer, Off())
    assert w.hover_index == -1 and not w.hover.visible


def test_axes_legend_exemplars_and_selection_gallery(plot, planted, qtbot):
    """Labelled axes, the cluster legend, exemplars nearest each centre (the noise-free patches
    planted in each group: a centre is the mean of its members, so they lie nearest it) and
    the selection shown as tiles."""
    from napari_gpfm.layers.gallery import cluster_exemplars

    _, w, _, s = plot
    assert not w.xaxis.visible  # nothing plotted yet
    _plot_pca(qtbot, w)
    assert w.axis_labels == ("PC1", "PC2") and w.xaxis.visible and w.yaxis.visible
    counts = np.bincount(s.clusters.labels)
    assert [n for n, _ in w.legend.entries] == [f"Cluster {c} ({n:,})"
                                                for c, n in enumerate(counts)]  # fmt: skip

    exemplars = cluster_exemplars(s.clusters, PLANTED)
    for group in planted:
        (cluster,) = set(s.clusters.labels[group].tolist())  # each group is one cluster
        assert sorted(exemplars[cluster].tolist()) == group.tolist()

    idx = w.select_box(w.xy.min(0), w.xy.max(0))  # all 1,600: a sample of 50 is shown
    assert w.gallery.count() == 50 and not w.gallery.isHidden()
    shown = [t.index for t in w.gallery.tiles]
    assert set(shown) <= set(idx.tolist()) and shown == sorted(shown)
    assert "50 of them" in w.gallery_label.text()
    assert [t.group for t in w.gallery.tiles] == s.clusters.labels[shown].tolist()
    assert w.gallery.wait() and w.gallery.error is None and len(w.gallery.images) == 50
    w.select_indices([])
    assert w.gallery.isHidden() and w.gallery.count() == 0
