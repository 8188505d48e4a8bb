"""One session behind every dock, in one window and across two."""

from __future__ import annotations

import numpy as np
import pytest
from user import add_dock, click, compute, gpfm_dock, new_window, open_slide, snap

from napari_gpfm.layers.session import result_name


def test_docks_added_before_and_after_see_one_store(make_napari_viewer, qtbot, sample_svs):
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    annotate = add_dock(viewer, "Annotate and classify")  # added before the embeddings exist
    dock = gpfm_dock(viewer, qtbot)
    status = compute(qtbot, dock)
    assert "patch embeddings" in status and layer.name in status
    plot = add_dock(viewer, "Embedding plot")  # added afterwards
    pathotune = add_dock(viewer, "PathoTune (prompt tuning)")

    # every dock got its own proxy of the viewer, and all of them share one session
    assert len({id(w.session) for w in (dock, annotate, plot, pathotune)}) == 1
    store = dock.session.slide(layer.name).store
    assert store is not None

    # the plot lists the slide and plots its PCA at the click of Plot
    assert plot.slide_combo.currentText() == layer.name
    with qtbot.waitSignal(plot.jobs.finished, timeout=30_000):
        click(qtbot, plot.plot_button)
    assert plot.xy is not None and len(plot.xy) == store.n_patches
    assert "No embeddings" not in plot.status.text()

    # the Annotate dock (added before) shows the store the GPFM dock computed
    assert str(store.path) in annotate.store_label.text() + annotate.store_edit.text()
    assert "embed the slide first" not in annotate.store_label.text()
    snap(viewer, "one_session_docks")

    # the slide layer publishes the results as plain data for other plugins and scripts
    results = layer.metadata["napari_gpfm"]["results"]
    assert results["store"] == str(store.path) and results["n_patches"] == store.n_patches


def test_two_windows_keep_separate_sessions(make_napari_viewer, qtbot, sample_svs):
    v1, v2 = new_window(make_napari_viewer), new_window(make_napari_viewer)
    open_slide(v1, sample_svs)
    open_slide(v2, sample_svs)
    dock1 = gpfm_dock(v1, qtbot)
    plot2 = add_dock(v2, "Embedding plot")
    compute(qtbot, dock1)
    assert dock1.session is not plot2.session
    assert dock1.session.embedded() and not plot2.session.embedded()
    assert plot2.slide_combo.count() == 0  # window 2 embedded nothing
    plot1 = add_dock(v1, "Embedding plot")
    assert plot1.session is dock1.session and plot1.slide_combo.count() == 1


def test_removing_a_slide_during_a_run_cancels_it(make_napari_viewer, qtbot, sample_svs):
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    dock = gpfm_dock(viewer, qtbot, patch_size=64)  # many small patches: a longer run
    dock.batch_size = 4
    with qtbot.waitSignal(dock.jobs.finished, timeout=120_000) as blocker:
        click(qtbot, dock.compute_button)
        qtbot.waitUntil(lambda: dock.jobs.last_progress is not None
                        and dock.jobs.last_progress.stage == "embedding", timeout=60_000)
        viewer.layers.remove(layer)
    assert blocker.args == ["cancelled"], dock.status.text()
    assert not dock.session.slides and dock.layer_combo.count() == 0
    assert dock.compute_button.isEnabled() and dock.preview_button.isEnabled()
    # the dock works on the next slide
    open_slide(viewer, sample_svs)
    compute(qtbot, dock)
    assert len(dock.session.embedded()) == 1


def test_cross_slide_similarity_by_mouse_twice(make_napari_viewer, qtbot, sample_svs, tmp_path):
    from mouse import click as canvas_click

    viewer = new_window(make_napari_viewer)
    a = open_slide(viewer, sample_svs)
    copy = tmp_path / "second.svs"
    copy.write_bytes(sample_svs.read_bytes())
    b = open_slide(viewer, copy)
    b.translate = (0, a.extent.world[1][1] + 100)  # side by side
    dock = gpfm_dock(viewer, qtbot)
    for layer in (a, b):
        dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(layer.name))
        compute(qtbot, dock)
    viewer.reset_view()
    viewer.layers.selection.active = a
    sa, sb = dock.session.slide(a.name), dock.session.slide(b.name)
    for state, index in ((sa, 3), (sb, 11)):
        qtbot.wait(50)
        canvas_click(qtbot, viewer, state.centre(index))
        qtbot.waitUntil(lambda s=state, i=index: dock.last_result is not None
                        and dock.last_result.query_slide == s.uid
                        and dock.last_result.query.tolist() == [i], timeout=10_000)
        res = dock.last_result
        assert set(res.scores) == {sa.uid, sb.uid}
        assert dock.hits_table.rowCount() == dock.topk_spin.value()
        hits = viewer.layers[result_name(state.name, "top hits")]
        assert len(hits.data) >= 1  # the query outline at least
        sim = viewer.layers[result_name(state.name, "similarity")]
        r, c = np.round(sim.world_to_data(state.centre(index))).astype(int)
        # the query patch is the most similar to itself (cosines are float32: another patch
        # with near-identical features can round a few ulps above it)
        assert sim.data[r, c] == pytest.approx(np.nanmax(sim.data), abs=1e-5)
        snap(viewer, f"similarity_click_{index}")
