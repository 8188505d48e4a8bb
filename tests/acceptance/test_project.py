"""The project dock ("Project (slide list)"), as QuPath's project: the slides of a folder and of
the window with their status, Embed all with a progress bar per slide (a bad slide named, the
others done), and a saved project reopened in a new window with its clusters, classes,
annotations and classifier."""

from __future__ import annotations

import numpy as np
import pytest
from gpfm_helpers import TINY
from user import (
    add_dock,
    click,
    draw_two_classes,
    gpfm_dock,
    new_window,
    open_slide,
    snap,
    start_annotating,
    tick,
)

from napari_gpfm._qt import project_widget
from napari_gpfm._qt.project_widget import ANNOTATED, EMBEDDED, PREDICTED, SLIDE

PROJECT = "Project (slide list)"


@pytest.fixture(autouse=True)
def napari_settings(tmp_path, monkeypatch):
    """napari's settings (and the reader offer's answer) in this test's folder."""
    import napari.settings as ns

    monkeypatch.setattr(ns, "_SETTINGS", ns.NapariSettings(config_path=tmp_path / "napari.yaml"))


def choose_folder(monkeypatch, folder) -> None:
    """The next folder dialog answers ``folder`` (as if the user picked it)."""
    monkeypatch.setattr(project_widget.QFileDialog, "getExistingDirectory",
                        lambda *a, **k: str(folder))  # fmt: skip


def project_dock(viewer, qtbot):
    """The project dock set up for the tiny model, as a user would (random weights ticked,
    custom 112 px patches at 0.5 µm/px)."""
    dock = add_dock(viewer, PROJECT)
    if not dock.random_check.isChecked():
        tick(qtbot, dock.random_check)
    dock.model_combo.setCurrentIndex(dock.model_combo.findData(TINY))
    dock.preset_combo.setCurrentText("custom")
    dock.mpp_spin.setValue(0.5)
    dock.size_spin.setValue(112)
    dock.batch_size = 16  # speed only
    return dock


def wait_read(qtbot, dock) -> None:
    qtbot.waitUntil(lambda: not dock.scan_jobs.busy, timeout=60_000)


def run(qtbot, dock, button, timeout=300_000) -> str:
    """Click Embed all / Apply classifier to all: every row shows a progress bar until the run
    ends; returns how the run ended."""
    with qtbot.waitSignal(dock.jobs.finished, timeout=timeout, raising=False) as blocker:
        click(qtbot, button)
        assert dock.jobs.busy, dock.status.text()
        assert all(dock.progress_bar(r) is not None for r in range(dock.table.rowCount()))
    assert blocker.signal_triggered, dock.status.text()
    assert all(dock.progress_bar(r) is None for r in range(dock.table.rowCount()))
    return blocker.args[0]


def cell(dock, row, col) -> str:
    return dock.table.item(row, col).text()


def name(dock, row) -> str:
    return cell(dock, row, SLIDE).split("\n")[0]


def test_embed_all_over_open_and_listed_slides(make_napari_viewer, qtbot, sample_svs, tmp_path,
                                               monkeypatch, user_env):  # fmt: skip
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "second.svs").write_bytes(sample_svs.read_bytes())
    (slides / "broken.svs").write_bytes(sample_svs.read_bytes()[:100_000])
    (slides / "notes.txt").write_text("not a slide")
    dock = project_dock(viewer, qtbot)
    assert dock.table.rowCount() == 1 and name(dock, 0) == layer.name  # open slides
    choose_folder(monkeypatch, slides)
    click(qtbot, dock.add_button)
    wait_read(qtbot, dock)
    names = [name(dock, r) for r in range(dock.table.rowCount())]
    assert names == [layer.name, "broken", "second"]
    assert cell(dock, 0, SLIDE).endswith("\n0.499 µm/px") and cell(dock, 2, SLIDE).endswith(
        "\n0.499 µm/px")  # fmt: skip
    assert cell(dock, 1, SLIDE).endswith("cannot read")
    assert not dock.table.item(2, SLIDE).icon().isNull()  # a thumbnail
    assert cell(dock, 0, EMBEDDED) == cell(dock, 2, EMBEDDED) == "–"
    dock.precision_combo.setCurrentText("bf16")

    assert run(qtbot, dock, dock.embed_button) == "done"
    steps = {s.name: s for s in dock.last_steps}
    assert steps[layer.name].error is None and steps["second"].error is None
    assert steps["broken"].error  # the bad slide is named with its problem, the others went on
    assert f"broken: {steps['broken'].error}" in dock.problems.text()
    assert "2 of 3 slide(s)" in dock.status.text() and "1 failed" in dock.status.text()
    # the open slide has its store in the session; the listed one its file in the project
    state = dock.session.slide(layer)
    assert state.store is not None and state.model == TINY
    stores = list(user_env.glob(f"*/features_{TINY}/second.h5"))
    assert stores
    import h5py

    with h5py.File(stores[0], "r") as f:  # the dock's precision is the store's
        assert f.attrs["gpfm_precision"] == "bf16"
    assert TINY in cell(dock, 0, EMBEDDED) and TINY in cell(dock, 2, EMBEDDED)
    assert cell(dock, 1, EMBEDDED) == "failed"
    assert dock.table.item(1, EMBEDDED).toolTip() == steps["broken"].error
    snap(viewer, "project_embed_all")


def annotate_and_train(viewer, qtbot, state):
    """Two classes drawn on the slide in the Annotate dock and the probe trained."""
    annotate = add_dock(viewer, "Annotate and classify")
    shapes = start_annotating(viewer, qtbot, annotate)
    draw_two_classes(viewer, qtbot, annotate, shapes, state)
    with qtbot.waitSignal(annotate.jobs.finished, timeout=60_000):
        click(qtbot, annotate.train_button)
    assert annotate.session.classifiers.get("probe") is not None, annotate.status_label.text()
    # a class-paint layer with a few cells painted in the second class (napari's Labels.paint,
    # what the brush calls)
    click(qtbot, annotate.new_paint_button)
    paint = annotate.paint_layer()
    assert paint is not None and paint.metadata["napari_gpfm"]["kind"] == "class-paint"
    stroma = annotate.session.palette.names.index("Stroma") + 1
    paint.brush_size = 1
    for cell in ((2, 3), (2, 4), (5, 7)):
        paint.paint(cell, stroma, refresh=False)
    paint.refresh()
    return shapes, paint


def wait_restored(qtbot, dock) -> str:
    """Open… restores in a job (files read in the worker, one layer per event-loop turn)."""
    qtbot.waitUntil(lambda: not dock.jobs.busy, timeout=120_000)
    return dock.jobs.outcome


def test_a_saved_project_reopens_in_a_new_window(make_napari_viewer, qtbot, sample_svs,
                                                 tmp_path, monkeypatch):  # fmt: skip
    study = tmp_path / "study"
    study.mkdir()
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    dock = project_dock(viewer, qtbot)
    choose_folder(monkeypatch, study)
    click(qtbot, dock.open_button)  # an empty folder: a new project there
    assert dock.session.out_dir == study and dock.folder_edit.text() == str(study)
    wait_read(qtbot, dock)
    assert run(qtbot, dock, dock.embed_button) == "done"
    state = dock.session.slide(layer)
    gpfm = gpfm_dock(viewer, qtbot)
    gpfm.k_spin.setValue(3)
    with qtbot.waitSignal(gpfm.cluster_jobs.finished, timeout=60_000):
        click(qtbot, gpfm.cluster_button)
    labels = state.clusters.labels.copy()
    # a heatmap (distance to centre) in magma, its range changed by the user
    gpfm.value_combo.setCurrentIndex(gpfm.value_combo.findData("distance_to_centre"))
    gpfm.cmap_combo.setCurrentText("magma")
    click(qtbot, gpfm.heatmap_button)
    heat = viewer.layers[f"{layer.name} · distance to centre"]
    heat.contrast_limits = (0.0, 2.5)
    distances = state.values["distance_to_centre"].copy()
    # a similarity query by a click on patch 5: heatmap and ranked top hits
    from mouse import click as canvas_click

    viewer.reset_view()
    viewer.layers.selection.active = layer
    qtbot.wait(50)
    canvas_click(qtbot, viewer, state.centre(5))
    qtbot.waitUntil(lambda: gpfm.last_result is not None, timeout=10_000)
    hits_before = np.asarray(viewer.layers[f"{layer.name} · top hits"].data).copy()
    ranked = [(i, round(sc, 5)) for _, i, sc in gpfm.last_result.hits]
    shapes, paint = annotate_and_train(viewer, qtbot, state)
    painted = np.asarray(paint.data).copy()
    assert (painted > 0).sum() == 3
    placed = (np.asarray(paint.scale).copy(), np.asarray(paint.translate).copy())
    probe = dock.session.classifiers["probe"]
    classes = list(dock.session.palette.names)
    assert cell(dock, 0, ANNOTATED) == "2\nStroma, Tumour"
    assert cell(dock, 0, PREDICTED) == "probe"
    assert run(qtbot, dock, dock.apply_button) == "done"
    assert (study / "predictions" / f"{layer.name}.geojson").is_file()
    click(qtbot, dock.save_button)
    assert (study / "project.json").is_file() and (study / "classes.json").is_file()
    assert list((study / "annotations").glob("*.geojson"))
    assert list((study / "classifiers").glob("probe.npz"))
    assert list((study / "paint").glob("*.npz")) and list((study / "heatmaps").glob("*.npz"))
    n_shapes = len(shapes.data)
    viewer.close()

    # a new window: nothing there until the project is opened
    viewer2 = new_window(make_napari_viewer)
    dock2 = add_dock(viewer2, PROJECT)
    assert not dock2.session.slides and not dock2.session.classifiers
    choose_folder(monkeypatch, study)
    click(qtbot, dock2.open_button)
    assert dock2.jobs.busy  # a job: progress and Cancel while it restores
    assert wait_restored(qtbot, dock2) == "done", dock2.jobs.status.text()
    session = dock2.session
    assert session.out_dir == study
    (s2,) = session.slides.values()
    assert s2.layer.multiscale and s2.store is not None and s2.model == TINY
    # clusters (and their map), classes, annotations and the classifier are back
    assert s2.clusters is not None and np.array_equal(s2.clusters.labels, labels)
    assert f"{s2.name} · clusters" in viewer2.layers
    assert list(session.palette.names) == classes
    ann = viewer2.layers[f"{s2.name} · annotations"]
    assert len(ann.data) == n_shapes
    assert sorted(ann.features["class"]) == ["Stroma", "Tumour"]
    clf = session.classifiers["probe"]
    assert clf.class_names == probe.class_names
    assert np.allclose(clf.weight, probe.weight)
    assert "probe" in s2.predictions  # the class map painted again
    # the heatmap, with its colormap and range, and the class paint (classes by name)
    heat2 = viewer2.layers[f"{s2.name} · distance to centre"]
    assert heat2.colormap.name == "magma"
    assert tuple(heat2.contrast_limits) == pytest.approx((0.0, 2.5))
    np.testing.assert_allclose(s2.values["distance_to_centre"], distances)
    paint2 = viewer2.layers[f"{s2.name} · class paint"]
    assert paint2.metadata["napari_gpfm"]["kind"] == "class-paint"
    assert np.array_equal(np.asarray(paint2.data), painted)
    assert np.allclose(paint2.scale, placed[0]) and np.allclose(paint2.translate, placed[1])
    assert "class-paint" in dock2.jobs.status.text() or "class paint" in dock2.jobs.status.text()
    # the similarity query: its heatmap and its ranked top hits, outlined where they were
    assert f"{s2.name} · similarity" in viewer2.layers
    np.testing.assert_allclose(np.asarray(viewer2.layers[f"{s2.name} · top hits"].data),
                               hits_before)
    assert [(i, round(sc, 5)) for _, i, sc in session.last_similarity.hits] == ranked
    assert session.last_similarity.query.tolist() == [5]
    assert "top hits on 1 slide(s)" in dock2.jobs.status.text()
    assert dock2.table.rowCount() == 1 and cell(dock2, 0, ANNOTATED) == "2\nStroma, Tumour"
    assert not dock2.problems.text(), dock2.problems.text()
    snap(viewer2, "project_reopened")


def test_choosing_gpfm_shows_the_authors_field(make_napari_viewer, qtbot):
    """As in the GPFM dock, picking GPFM shows its card's tiling: the authors' 128 µm field
    (512 px at 0.25 µm/px resized to 224), not TRIDENT's 224 px at 0.5 µm/px."""
    viewer = new_window(make_napari_viewer)
    dock = add_dock(viewer, PROJECT)
    dock.model_combo.setCurrentIndex(dock.model_combo.findData(TINY))
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("gpfm"))
    assert dock.preset_combo.currentText() == "gpfm-40x-512to224"
    assert dock.size_spin.value() * dock.mpp_spin.value() == pytest.approx(128.0)
    assert "gpfm" in dock.settings_box.title()
