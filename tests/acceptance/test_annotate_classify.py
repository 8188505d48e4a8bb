"""Classes, annotation layers drawn with the mouse, the live probe's class map, and class maps
on a second, translated slide, through the docks a pathologist opens from the Plugins menu."""

from __future__ import annotations

import numpy as np
from mouse import draw_rectangle
from user import (
    add_class,
    add_dock,
    choose_class,
    class_maps,
    click,
    compute,
    draw_two_classes,
    gpfm_dock,
    new_window,
    open_slide,
    snap,
    start_annotating,
    tick,
)


def test_draw_two_classes_and_see_the_live_class_map(make_napari_viewer, qtbot, sample_svs):
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    dock = gpfm_dock(viewer, qtbot)
    compute(qtbot, dock)
    annotate = add_dock(viewer, "Annotate and classify")
    state = annotate.session.slide(layer)
    shapes = start_annotating(viewer, qtbot, annotate)
    assert shapes is not None and type(shapes).__name__ == "Shapes"
    tick(qtbot, annotate.live_check)
    top, bottom = draw_two_classes(viewer, qtbot, annotate, shapes, state)
    # each shape took the class active when it was drawn
    assert list(shapes.features["class"]) == ["Tumour", "Stroma"]
    # the live probe paints a class map on the embedded grid
    qtbot.waitUntil(lambda: bool(class_maps(viewer, state.uid)), timeout=30_000)
    cmap = class_maps(viewer, state.uid)[0]
    g = state.grid
    for idx, value in ((top, 1), (bottom, 2)):  # class i is painted i + 1
        for i in idx:
            assert cmap.data[g.rows[i], g.cols[i]] == value
    assert "Tumour" in annotate.labels_label.text() + annotate.status_label.text()
    snap(viewer, "annotate_live_probe")


def test_class_maps_follow_a_translated_second_slide(make_napari_viewer, qtbot, sample_svs,
                                                     tmp_path):  # fmt: skip
    viewer = new_window(make_napari_viewer)
    a = open_slide(viewer, sample_svs)
    copy = tmp_path / "neighbour.svs"
    copy.write_bytes(sample_svs.read_bytes())
    b = open_slide(viewer, copy)
    shift = (250.0, a.extent.world[1][1] + 200.0)
    b.translate = shift
    dock = gpfm_dock(viewer, qtbot)
    for la in (a, b):
        dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(la.name))
        compute(qtbot, dock)
    annotate = add_dock(viewer, "Annotate and classify")
    annotate.slide_combo.setCurrentIndex(annotate.slide_combo.findText(a.name))
    sa, sb = annotate.session.slide(a), annotate.session.slide(b)
    shapes = start_annotating(viewer, qtbot, annotate)
    top, bottom = draw_two_classes(viewer, qtbot, annotate, shapes, sa)
    click(qtbot, annotate.train_button)
    qtbot.waitUntil(lambda: bool(class_maps(viewer, sa.uid)), timeout=30_000)
    click(qtbot, annotate.apply_button)
    qtbot.waitUntil(lambda: bool(class_maps(viewer, sb.uid)), timeout=30_000)
    cmap = class_maps(viewer, sb.uid)[0]
    viewer.reset_view()
    snap(viewer, "class_maps_two_slides")
    # the cell of patch i of slide b covers patch i's footprint on slide b, not on slide a
    g, P, m = sb.grid, sb.patch_size_level0, sb.mpp
    for i in (0, sb.n // 2, sb.n - 1):
        x, y = sb.coords[i]
        lo = cmap.data_to_world((g.rows[i] - 0.5, g.cols[i] - 0.5))
        np.testing.assert_allclose(lo, ((y - 0.5) * m + shift[0], (x - 0.5) * m + shift[1]),
                                   atol=1e-6)  # fmt: skip
        hi = cmap.data_to_world((g.rows[i] + g.k - 0.5, g.cols[i] + g.k - 0.5))
        np.testing.assert_allclose(hi, ((y + P - 0.5) * m + shift[0], (x + P - 0.5) * m + shift[1]),
                                   atol=1e-6)  # fmt: skip


def test_napari_own_new_shapes_button_with_the_dock_open(make_napari_viewer, qtbot, sample_svs):
    """The layer list's "new shapes layer" button, then a rectangle drawn: no error, and the
    shape takes the active class."""
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    annotate = add_dock(viewer, "Annotate and classify")
    add_class(qtbot, annotate, "Tumour")
    add_class(qtbot, annotate, "Stroma")
    choose_class(qtbot, annotate, "Stroma")
    buttons = viewer.window._qt_viewer.layerButtons
    click(qtbot, buttons.newShapesButton)
    shapes = viewer.layers[-1]
    assert type(shapes).__name__ == "Shapes"
    qtbot.wait(50)
    ext = np.asarray(layer.extent.world)
    c = ext.mean(0)
    draw_rectangle(qtbot, viewer, shapes, c - 40, c + 40)
    assert len(shapes.data) == 1
    assert list(shapes.features["class"]) == ["Stroma"]


def test_results_are_published_as_plain_data(make_napari_viewer, qtbot, sample_svs):
    """Other plugins and scripts read the results from napari's own places."""
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    dock = gpfm_dock(viewer, qtbot)
    compute(qtbot, dock)
    with qtbot.waitSignal(dock.cluster_jobs.finished, timeout=30_000):
        click(qtbot, dock.cluster_button)
    annotate = add_dock(viewer, "Annotate and classify")
    state = annotate.session.slide(layer)
    shapes = start_annotating(viewer, qtbot, annotate)
    top, bottom = draw_two_classes(viewer, qtbot, annotate, shapes, state)
    with qtbot.waitSignal(annotate.jobs.finished, timeout=30_000):
        click(qtbot, annotate.train_button)
    results = layer.metadata["napari_gpfm"]["results"]
    assert results["clusters"] == dock.k_spin.value()
    assert results["predictions"] == {"probe": ["Tumour", "Stroma"]}
    assert results["n_patches"] == state.n and results["model"] == state.model
    cmap = class_maps(viewer, state.uid)[0]
    assert list(cmap.features["class"]) == ["none", "Tumour", "Stroma"]
    clusters = [la for la in viewer.layers
                if la.metadata.get("napari_gpfm", {}).get("slide_uid") == state.uid
                and la.metadata["napari_gpfm"].get("kind") == "labels"][0]
    assert len(clusters.features) == dock.k_spin.value() + 1
