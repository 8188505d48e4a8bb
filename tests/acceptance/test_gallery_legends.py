"""Tile galleries and legends, as a pathologist meets them: similarity hits, cluster exemplars and
points selected in the embedding plot shown as thumbnails of the slide's own pixels (a click
centres the viewer there), a colour bar with the right value range on every heatmap, the
clusters' legend, labelled plot axes, and no silent waits (index build, UMAP)."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest
from mouse import canvas
from mouse import click as canvas_click
from qtpy.QtCore import Qt
from user import add_dock, click, compute, gpfm_dock, new_window, open_slide, snap

from napari_gpfm.layers.session import result_name
from napari_gpfm.slide import open_slide as open_wsi


def world_centre(coord, P, mpp):
    """World (y, x) µm of the centre of the patch at level-0 top-left ``coord`` (x, y)."""
    x, y = coord
    return np.array(((y + P / 2 - 0.5) * mpp, (x + P / 2 - 0.5) * mpp))


def store_coords(state):
    """Patch coordinates and size read from the feature file itself (h5py)."""
    with h5py.File(state.store.path, "r") as f:
        return f["coords"][()], int(f["coords"].attrs["patch_size_level0"])


def assert_slide_pixels(gallery, path):
    """Each thumbnail equals the slide's pixels at its patch (read here, independently)."""
    assert gallery.wait() and gallery.images is not None, gallery.error
    state = gallery.session.slides[gallery.tiles[0].uid]
    coords, P = store_coords(state)
    wsi = open_wsi(path)
    size = gallery.tile_size
    assert gallery.images.shape == (len(gallery.tiles), size, size, 3)
    for t, img in zip(gallery.tiles, gallery.images):
        x, y = (int(v) for v in coords[t.index])
        np.testing.assert_array_equal(img, wsi.read_patch(x, y, P, size))
    assert len({img.tobytes() for img in gallery.images}) > 1  # not one picture repeated


def click_tile(qtbot, gallery, row: int) -> None:
    """Scroll the tile into view and click it, as a user does."""
    item = gallery.item(row)
    gallery.scrollToItem(item)
    gallery.window().activateWindow()
    qtbot.wait(20)
    assert gallery.isVisible()
    rect = gallery.visualItemRect(item)
    assert gallery.viewport().rect().contains(rect.center())
    qtbot.mouseClick(gallery.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def assert_camera_on(viewer, state, index):
    """The camera centre is on the patch's centre (the slide layer's translate applied)."""
    coords, P = store_coords(state)
    want = world_centre(coords[index], P, state.mpp) + np.asarray(state.layer.translate)[-2:]
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], want, atol=1e-6)


def drawn_colorbar_range(viewer, layer):
    """The value range the colour bar overlay on the canvas is drawn with (visible)."""
    visual = canvas(viewer)._layer_overlay_to_visual[layer][layer.colorbar]
    assert visual.node.visible, f"{layer.name}: no colour bar on the canvas"
    return tuple(float(v) for v in visual.node.img.clim)


def assert_legend_text(legend, limits):
    """The dock's legend writes the two ends of the range, low on the left."""
    lo, hi = (float(legend.lo_label.text()), float(legend.hi_label.text()))
    assert lo < hi
    assert lo == pytest.approx(limits[0], rel=1e-3) and hi == pytest.approx(limits[1], rel=1e-3)


@pytest.fixture
def embedded(make_napari_viewer, qtbot, sample_svs):
    """A 1280×800 window, the sample opened twice (the second copy finds the first's store),
    the GPFM dock from the Plugins menu, the first slide embedded and clustered (k = 4)."""
    viewer = new_window(make_napari_viewer)
    a = open_slide(viewer, sample_svs)
    b = open_slide(viewer, sample_svs)
    b.translate = (0, a.extent.world[1][1] + 100)  # side by side
    dock = gpfm_dock(viewer, qtbot)
    dock.layer_combo.setCurrentIndex(dock.layer_combo.findData(int(a.unique_id)))
    compute(qtbot, dock)
    with qtbot.waitSignal(dock.cluster_jobs.finished, timeout=30_000) as blocker:
        click(qtbot, dock.cluster_button)
    assert blocker.args == ["done"], dock.cluster_jobs.status.text()
    return viewer, dock, dock.session.slide(a), dock.session.slide(b)


def test_similarity_hits_gallery(embedded, qtbot, sample_svs):
    viewer, dock, s, other = embedded
    viewer.layers[result_name(s.name, "clusters")].visible = False
    viewer.reset_view()
    viewer.layers.selection.active = s.layer
    assert not other.has_store  # found in the output folder at the first query

    # a click on a patch: the other slide's index is built in a job (with a message), then
    # the query runs; nothing of it on the main thread
    canvas_click(qtbot, viewer, s.centre(40))
    qtbot.waitUntil(lambda: dock.last_result is not None, timeout=30_000)
    assert dock.sim_jobs.last_progress is not None
    assert dock.sim_jobs.last_progress.stage == "indexing"
    assert "index" in dock.sim_jobs.last_progress.message
    res = dock.last_result
    assert res.query.tolist() == [40] and set(res.scores) == {s.uid, other.uid}

    # the hits as thumbnails, best first, with score and slide name (and patch in the tooltip)
    gallery = dock.hits_gallery
    assert gallery.isVisible() and gallery.count() == len(res.hits) == dock.topk_spin.value()
    for row, (uid, idx, score) in enumerate(res.hits):
        item = gallery.item(row)
        score_line, name_line = item.text().split("\n")
        assert score_line.split()[0] == f"#{row + 1}"  # as numbered on the slide
        assert float(score_line.split()[1]) == pytest.approx(score, abs=5e-4)
        assert name_line == res.names[uid]
        assert f"slide: {res.names[uid]}" in item.toolTip()
        assert f"patch: {idx}" in item.toolTip()
    assert_slide_pixels(gallery, sample_svs)
    snap(viewer, "gallery_hits")

    # a click on a tile centres the viewer on that patch (a hit on the other slide too)
    for row in (2, next(r for r, h in enumerate(res.hits) if h[0] == other.uid)):
        uid, idx, _ = res.hits[row]
        click_tile(qtbot, gallery, row)
        assert_camera_on(viewer, dock.session.slides[uid], idx)
        assert viewer.scene.camera.zoom > 0


def test_heatmaps_have_colour_bars_with_their_range(embedded, qtbot):
    viewer, dock, s, _ = embedded
    res = dock.handle_click(s.centre(12))
    assert res is not None, dock.sim_jobs.status.text()
    for uid in res.scores:
        sim = viewer.layers[result_name(dock.session.slides[uid].name, "similarity")]
        qtbot.waitUntil(lambda sim=sim: sim.colorbar.visible, timeout=2000)  # the next tick
        lo, hi = sim.contrast_limits
        assert lo <= float(np.nanmin(sim.data)) and hi >= float(np.nanmax(sim.data))
        np.testing.assert_allclose(drawn_colorbar_range(viewer, sim), (lo, hi), rtol=1e-6)
    # the dock names the heatmap and states its range
    sim = viewer.layers[result_name(s.name, "similarity")]
    assert dock.legend.isVisible() and dock.legend.layer is sim
    assert dock.legend.value_range == pytest.approx(tuple(sim.contrast_limits))
    assert "cosine similarity" in dock.legend.title.text()
    assert_legend_text(dock.legend, sim.contrast_limits)

    # Show heatmap (distance to centre): its own colour bar, following its contrast limits
    dock.value_combo.setCurrentIndex(dock.value_combo.findData("distance_to_centre"))
    click(qtbot, dock.heatmap_button)
    heat = viewer.layers[result_name(s.name, "distance to centre")]
    qtbot.waitUntil(lambda: heat.colorbar.visible, timeout=2000)  # built in the next tick
    assert dock.legend.layer is heat
    d = s.clusters.distances
    assert tuple(heat.contrast_limits) == pytest.approx((d.min(), d.max()), rel=1e-5)
    np.testing.assert_allclose(drawn_colorbar_range(viewer, heat), heat.contrast_limits, rtol=1e-6)
    heat.contrast_limits = (0.0, float(d.max()) * 2)
    np.testing.assert_allclose(drawn_colorbar_range(viewer, heat), heat.contrast_limits, rtol=1e-6)
    assert dock.legend.value_range == pytest.approx(tuple(heat.contrast_limits))
    assert_legend_text(dock.legend, heat.contrast_limits)
    snap(viewer, "legends_heatmap")


def test_cluster_legend_and_exemplars(embedded, qtbot, sample_svs):
    viewer, dock, s, _ = embedded
    labels = viewer.layers[result_name(s.name, "clusters")]
    k = int(s.clusters.labels.max()) + 1
    # the cluster table is the legend: names as in the Labels layer's features, same colours
    table = dock.cluster_table
    assert table.rowCount() == k
    for c in range(k):
        item = table.item(c, 0)
        assert item.text() == labels.features["cluster"][c + 1] == f"Cluster {c}"
        assert not item.icon().isNull()
        np.testing.assert_allclose(item.data(Qt.ItemDataRole.UserRole),
                                   labels.colormap.map(c + 1).ravel(), atol=1e-6)  # fmt: skip

    # exemplars: for each cluster, the 4 patches nearest its centre by the clustering's
    # distances, nearest first; where the embeddings spread more than float32 noise (not the
    # tiny random model's), also by distances computed here (float64) from the feature file
    gallery = dock.exemplars
    assert gallery.isVisible()
    with h5py.File(s.store.path, "r") as f:
        x = f["features"][()].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.linalg.norm(x - s.clusters.centres[s.clusters.labels], axis=1)
    for c in range(k):
        got = [t.index for t in gallery.tiles if t.group == c]
        members = np.flatnonzero(s.clusters.labels == c)
        n = min(4, len(members))
        want = members[np.argsort(s.clusters.distances[members], kind="stable")[:n]]
        assert got == want.tolist()
        assert [t.score for t in gallery.tiles if t.group == c] == pytest.approx(
            s.clusters.distances[want].tolist())  # fmt: skip
        if np.ptp(dist[members]) > 1e-2:
            assert dist[got].max() <= np.median(dist[members])
    assert [t.group for t in gallery.tiles] == sorted(t.group for t in gallery.tiles)
    assert_slide_pixels(gallery, sample_svs)
    click_tile(qtbot, gallery, 5)
    assert_camera_on(viewer, s, gallery.tiles[5].index)
    snap(viewer, "gallery_exemplars")


def test_plot_axes_legend_selection_gallery(embedded, qtbot, sample_svs):
    viewer, _, s, _ = embedded
    plot = add_dock(viewer, "Embedding plot")
    snap(viewer, "plot_before")  # the legend's line is there, empty, before any plot
    with qtbot.waitSignal(plot.jobs.finished, timeout=30_000):
        click(qtbot, plot.plot_button)
    assert plot.axis_labels == ("PC1", "PC2")
    snap(viewer, "plot_legend")
    # the colour legend: one entry per cluster, in the points' colours
    k = int(s.clusters.labels.max()) + 1
    names = [n for n, _ in plot.legend.entries]
    assert [n.split(" (")[0] for n in names] == [f"Cluster {c}" for c in range(k)]
    counts = np.bincount(s.clusters.labels, minlength=k)
    assert [int(n.split("(")[1].rstrip(")").replace(",", "")) for n in names] == counts.tolist()
    for c, (_, rgba) in enumerate(plot.legend.entries):
        np.testing.assert_allclose(plot.colours()[s.clusters.labels == c][0], rgba)
    assert plot.legend.isVisible()

    # a box selection -> its patches as tiles of the slide's pixels; a click goes there
    lo, hi = np.percentile(plot.xy, 30, axis=0), np.percentile(plot.xy, 70, axis=0)
    idx = plot.select_box(lo, hi)
    assert 0 < idx.size <= 50
    gallery = plot.gallery
    assert gallery.isVisible() and [t.index for t in gallery.tiles] == idx.tolist()
    assert_slide_pixels(gallery, sample_svs)
    click_tile(qtbot, gallery, 0)
    assert_camera_on(viewer, s, idx[0])

    # the plot grows with its dock
    qdock = plot.parent()
    while qdock is not None and not hasattr(qdock, "setFloating"):
        qdock = qdock.parent()
    qdock.setFloating(True)
    qdock.resize(500, 700)
    qtbot.wait(50)
    small = plot.canvas.native.size()
    qdock.resize(900, 1000)
    qtbot.wait(50)
    big = plot.canvas.native.size()
    assert big.width() > small.width() + 300 and big.height() > small.height() + 200


def test_umap_shows_pca_first(embedded, qtbot, monkeypatch):
    """UMAP is slow: the plot shows the PCA at once, says UMAP is fitting, then swaps."""
    from napari_gpfm.analyses import clusters

    viewer, _, s, _ = embedded
    release = threading.Event()

    def slow_umap(features, n_components=2, seed=0, **kw):  # stands in for umap-learn
        assert release.wait(30)
        return clusters.pca(features, n_components, seed=seed)[:, ::-1] * 3

    monkeypatch.setattr(clusters, "umap_available", lambda: True)
    monkeypatch.setattr(clusters, "umap", slow_umap)
    plot = add_dock(viewer, "Embedding plot")
    plot.method_combo.setCurrentIndex(plot.method_combo.findData("umap"))
    click(qtbot, plot.plot_button)
    qtbot.waitUntil(lambda: plot.method == "pca" and plot.jobs.busy, timeout=30_000)
    assert plot.axis_labels == ("PC1", "PC2") and len(plot.xy) == s.n
    qtbot.waitUntil(lambda: plot.status.text().startswith("UMAP: fitting on"), timeout=10_000)
    assert f"{s.n:,} patches" in plot.status.text()
    release.set()
    qtbot.waitUntil(lambda: plot.method == "umap" and not plot.jobs.busy, timeout=30_000)
    assert plot.axis_labels == ("UMAP1", "UMAP2")
    np.testing.assert_allclose(plot.xy, s.projections["umap"])
