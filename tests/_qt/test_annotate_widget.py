"""The 'Annotate and classify' dock as a user drives it: docks from the Plugins menu, slides from
File > Open (moved in the world), embeddings from the GPFM dock, clicks on the dock's buttons,
shapes drawn with the mouse."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from mouse import draw_rectangle as mouse_rectangle
from plugin_docks import (
    add_dock,
    click,
    draw_rectangle,
    embed,
    new_shapes_from_menu,
    open_slide,
    setup_gpfm,
    world_rect,
    write_tiny_card,
)

from napari_gpfm._qt import annotate_widget as aw

OFFSET = (120.0, -80.0)  # where the slide layer is moved to (world µm, y x)


@pytest.fixture(autouse=True)
def tiny_models(tmp_path_factory, tmp_path, monkeypatch):
    """The tiny random model card; the default output folder is private to the test (no class
    palette of another run is loaded)."""
    d = write_tiny_card(tmp_path_factory.getbasetemp() / "qt-models")
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
    monkeypatch.setenv("NAPARI_GPFM_FEATURES_DIR", str(tmp_path / "default-features"))
    return d


@pytest.fixture
def errors(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(aw, "show_error", seen.append)
    monkeypatch.setattr(aw, "show_info", lambda m: None)
    return seen


def _add_classes(qtbot, w, *names):
    for name in names:
        w.class_name_edit.setText(name)
        click(qtbot, w.add_button)


def _grid_translate(store, mpp, offset):
    """Where a patch raster of ``store`` must sit: first cell centre, plus the slide's offset."""
    c, P = store.coords, store.patch_size_level0
    return ((c[:, 1].min() + P / 2 - 0.5) * mpp + offset[0],
            (c[:, 0].min() + P / 2 - 0.5) * mpp + offset[1])  # fmt: skip


def test_live_probe_on_the_embeddings_of_the_gpfm_dock(make_napari_viewer, qtbot, sample_svs,
                                                       tmp_path, errors):  # fmt: skip
    viewer = make_napari_viewer(show=True)  # shapes are drawn with the mouse on the canvas
    viewer.window._qt_window.resize(1280, 800)
    slide = open_slide(viewer, sample_svs, OFFSET)
    mpp = float(slide.scale[-1])
    w = add_dock(viewer, "annotate")  # before any embeddings exist
    assert f"{slide.name}: no embeddings yet" in w.store_label.text()
    assert w.slide_combo.currentText() == slide.name

    store = embed(qtbot, setup_gpfm(viewer, tmp_path), slide)  # in the GPFM dock
    assert store.path.name in w.store_label.text() and "tiny-qt" in w.store_label.text()

    _add_classes(qtbot, w, "Tumor", "Stroma")
    assert [w.class_list.item(i).text() for i in range(w.class_list.count())] == ["Tumor",
                                                                                  "Stroma"]
    click(qtbot, w.new_layer_button)  # clicked(bool) must not reach the method
    layer = w.annotation_layer()
    assert layer is not None and layer.name == f"{slide.name} · annotations"
    assert tuple(layer.scale) == pytest.approx((mpp, mpp))
    assert tuple(layer.translate) == pytest.approx(OFFSET)  # on the moved slide
    click(qtbot, w.new_paint_button)
    paint = w.paint_layer()
    assert paint is not None and paint.name == f"{slide.name} · class paint"
    assert paint.data_to_world((0, 0)) == pytest.approx(
        slide.data_to_world((7.5, 7.5)))  # label pixel 0 covers level-0 [0, 16)
    assert not errors

    c, P = store.coords, store.patch_size_level0
    xs = np.unique(c[:, 0])
    lo, hi = int(xs[len(xs) // 3]), int(xs[2 * len(xs) // 3])
    y0, y1 = int(c[:, 1].min()), int(c[:, 1].max() + P)
    w.live_check.setChecked(True)
    viewer.reset_view()
    w.class_list.setCurrentRow(0)  # Tumor
    # rectangle edges a quarter patch into the next column, so a screen pixel of rounding
    # cannot change which patches are inside (coverage 0.25 < 0.5 <= 0.75)
    mouse_rectangle(qtbot, viewer, layer,
                    *world_rect(slide, c[:, 0].min(), y0, lo + P // 4, y1)[::2])
    assert layer.features["class"].tolist() == ["Tumor"]
    # one class only: the dock says what is missing, no map yet
    qtbot.waitUntil(lambda: "two classes" in w.status_label.text(), timeout=10_000)
    assert f"{slide.name} · probe classes" not in viewer.layers

    w.class_list.setCurrentRow(1)  # Stroma: the next shape gets it, not the previous class
    mouse_rectangle(qtbot, viewer, layer,
                    *world_rect(slide, hi - P // 4, y0, c[:, 0].max() + P, y1)[::2])
    assert layer.features["class"].tolist() == ["Tumor", "Stroma"]
    assert np.allclose(layer.edge_color[1, :3], np.array(w.palette.colour("Stroma")) / 255)
    qtbot.waitUntil(lambda: "balanced accuracy" in w.accuracy_label.text(), timeout=30_000)
    qtbot.waitUntil(lambda: not w.busy, timeout=10_000)
    assert not errors
    # the shapes were read on the moved slide: exactly the patches inside each rectangle
    assert w.labels.counts == {"Tumor": int((c[:, 0] < lo).sum()),
                               "Stroma": int((c[:, 0] >= hi).sum())}  # fmt: skip
    assert f"Tumor {int((c[:, 0] < lo).sum())}" in w.labels_label.text()
    # the labelled patches per class in a table, and the small-sample warning when it applies
    table = w.counts_table
    counts = {table.item(r, 0).text(): int(table.item(r, 1).text().replace(",", ""))
              for r in range(table.rowCount())}  # fmt: skip
    assert counts == w.labels.counts
    few = min(counts.values()) < 20 or sum(counts.values()) < 30
    assert w.warning_label.isVisibleTo(w) == few
    assert w.table.rowCount() == 2 and w.table.columnCount() == 3
    assert w.table.verticalHeaderItem(0).text() == "Tumor"
    assert w.table.item(0, 2).text() not in ("", "-")

    cmap = viewer.layers[f"{slide.name} · probe classes"]
    assert type(cmap).__name__ == "Labels"
    assert tuple(cmap.scale) == pytest.approx((P * mpp, P * mpp))
    assert tuple(cmap.translate) == pytest.approx(_grid_translate(store, mpp, OFFSET))
    assert (np.asarray(cmap.data) > 0).sum() == store.n_patches
    assert cmap.colormap.map(np.array([1]))[0, :3] == pytest.approx(np.array([200, 0, 0]) / 255)
    p = viewer.layers[f"{slide.name} · probe P(Tumor)"]
    assert np.isnan(p.data[np.asarray(cmap.data) == 0]).all()
    assert f"{slide.name} · probe uncertainty" in viewer.layers
    assert w.session.classifiers["probe"] is w.probe

    # a class change on a shape retrains too (features event)
    before = w.report
    from napari_gpfm.layers.annotation_layers import set_class_of

    px, py = (int(v) for v in c[(c[:, 0] >= lo) & (c[:, 0] < hi)][0])  # a middle patch
    draw_rectangle(layer, world_rect(slide, px, py, px + P, py + P))
    set_class_of(layer, [2], "Tumor")
    qtbot.waitUntil(lambda: w.report is not before and not w.busy, timeout=30_000)
    assert w.labels.counts["Tumor"] == int((c[:, 0] < lo).sum()) + 1

    # an edit while a run is going: that run is dropped and a new one trains after it
    w.live_check.setChecked(False)
    outcomes: list[str] = []
    w.jobs.finished.connect(outcomes.append)
    w.retrain()
    assert w.busy
    w.retrain()  # what the debounced edit calls
    qtbot.waitUntil(lambda: len(outcomes) == 2 and not w.busy, timeout=30_000)
    assert outcomes[-1] == "done" and outcomes[0] in ("cancelled", "done")

    # napari's own File > New Layer > Shapes over the slide: new shapes get the active class
    viewer.layers.selection.active = slide
    mine = new_shapes_from_menu(viewer)
    w.set_active_class("Stroma")
    draw_rectangle(mine, world_rect(slide, px, py, px + P, py + P))
    assert mine.features["class"].tolist() == ["Stroma"]

    # classes are kept with the project (the output folder)
    saved = json.loads((tmp_path / "classes.json").read_text())
    assert [k["name"] for k in saved["classes"]] == ["Tumor", "Stroma"]


def test_geojson_classifier_files_and_apply_to_open_slides(make_napari_viewer, qtbot, sample_svs,
                                                           tmp_path, errors):  # fmt: skip
    viewer = make_napari_viewer()
    slide = open_slide(viewer, sample_svs, OFFSET)
    mpp = float(slide.scale[-1])
    gpfm = setup_gpfm(viewer, tmp_path / "project")
    store = embed(qtbot, gpfm, slide)
    w = add_dock(viewer, "annotate")  # after the embeddings exist
    assert store.path.name in w.store_label.text()

    c, P = store.coords, store.patch_size_level0
    xs = np.sort(np.unique(c[:, 0]))
    lo, hi = int(xs[len(xs) // 3]), int(xs[2 * len(xs) // 3])
    y0, y1 = int(c[:, 1].min()), int(c[:, 1].max() + P)
    mid = c[(c[:, 0] > lo + P) & (c[:, 0] + P < hi)]
    ix, iy = (int(v) for v in mid[len(mid) // 2])  # one patch, all Ignore*
    x_min, x_max = int(c[:, 0].min()), int(c[:, 0].max() + P)
    qupath = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "t1", "geometry": {"type": "Polygon", "coordinates": [
            [[x_min, y0], [lo, y0], [lo, y1], [x_min, y1], [x_min, y0]],
            [[lo - 50, y0 + 10], [lo - 20, y0 + 10], [lo - 20, y0 + 40.5], [lo - 50, y0 + 10]]]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Tumor", "color": [255, 0, 0]}}},
        {"type": "Feature", "id": "s1", "geometry": {"type": "MultiPolygon", "coordinates": [
            [[[hi, y0], [x_max, y0], [x_max, y1], [hi, y1], [hi, y0]]],
            [[[lo, y0], [lo + 30, y0], [lo + 30, y0 + 30], [lo, y0]]]]},
         "properties": {"objectType": "annotation", "name": "stroma",
                        "classification": {"name": "Stroma", "color": [0, 128, 0]}}},
        {"type": "Feature", "id": "i1", "geometry": {"type": "Polygon", "coordinates": [
            [[ix, iy], [ix + P, iy], [ix + P, iy + P], [ix, iy + P], [ix, iy]]]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Ignore*", "color": [180, 180, 180]}}},
    ]}  # fmt: skip
    src = tmp_path / "qupath.geojson"
    src.write_text(json.dumps(qupath))
    layer = w.import_geojson(src)
    assert layer.name == f"{slide.name} · qupath"
    assert w.palette.names == ["Tumor", "Stroma", "Ignore*"]
    assert w.palette.colour("Tumor") == (255, 0, 0)  # the file's colours win
    assert len(layer.data) == 4
    # the imported shapes lie on the moved slide: level-0 (x_min, y0) at its world position
    corner = layer.data_to_world(layer.data[0][0])
    assert corner == pytest.approx(slide.data_to_world((y0 - 0.5, x_min - 0.5)))
    out = tmp_path / "back.geojson"
    w.export_geojson(out)
    assert json.loads(out.read_text()) == qupath

    w.set_active_class("Stroma")  # a shape drawn on the imported layer gets the active class
    draw_rectangle(layer, world_rect(slide, lo, y1 - P, lo + P, y1))
    assert layer.features["class"].tolist()[-1] == "Stroma"

    with qtbot.waitSignal(w.jobs.finished, timeout=30_000) as blocker:
        click(qtbot, w.train_button)
    assert blocker.args == ["done"], w.status_label.text()
    assert w.report is not None and "balanced accuracy" in w.accuracy_label.text()
    assert w.labels.ignored.sum() == 1 and w.labels.excluded_classes == ["Ignore*"]
    assert "ignored: 1 patches" in w.labels_label.text()
    clf = w.save_classifier(tmp_path / "tumour.npz")
    assert clf is not None

    # a second open slide without embeddings is named; the first one is painted
    other_svs = shutil.copy(sample_svs, tmp_path / "other.svs")
    other = open_slide(viewer, other_svs, (0.0, 2000.0))
    viewer.layers.remove(f"{slide.name} · probe classes")
    with qtbot.waitSignal(w.apply_jobs.finished, timeout=30_000):
        click(qtbot, w.apply_button)
    assert f"{slide.name} · probe classes" in viewer.layers
    assert "other · probe classes" not in viewer.layers
    assert "other: no embeddings yet" in w.apply_label.text()
    assert "1 of 2" in w.apply_jobs.status.text()

    # once the GPFM dock embedded it, Apply paints it too, on the slide wherever it sits
    other_store = embed(qtbot, gpfm, other)
    with qtbot.waitSignal(w.apply_jobs.finished, timeout=30_000):
        click(qtbot, w.apply_button)
    assert "2 of 2" in w.apply_jobs.status.text() and not errors
    omap = viewer.layers["other · probe classes"]
    assert tuple(omap.translate) == pytest.approx(
        _grid_translate(other_store, mpp, (0.0, 2000.0)))
    assert (np.asarray(omap.data) > 0).sum() == other_store.n_patches

    # loading the saved classifier for the other slide paints it with the file's classes
    viewer.layers.remove("other · probe classes")
    w.select_slide(other)
    with qtbot.waitSignal(w.apply_jobs.finished, timeout=30_000):
        assert w.load_classifier(clf) is not None  # a background job: the window stays live
    assert "other · probe classes" in viewer.layers and w.probe is not None

    # a classifier of another recipe is refused with an error notification
    from napari_gpfm.analyses.probe import load_probe

    bad = load_probe(clf)
    bad.recipe = dict(bad.recipe, model="gpfm", weights_sha256="f" * 64)
    bad.save(tmp_path / "bad.npz")
    with qtbot.waitSignal(w.apply_jobs.finished, timeout=30_000):
        w.load_classifier(tmp_path / "bad.npz")
    assert w.apply_jobs.outcome == "error"
    assert errors and "another model or recipe" in errors[-1] and "gpfm" in errors[-1]
    assert "another model or recipe" in w.status_label.text()


def test_a_pathotune_file_loads_and_paints_in_the_annotate_dock(make_napari_viewer, qtbot,
                                                               sample_svs, tmp_path, errors):
    """The dock reads classifier files through the one loader: a PathoTune ``.safetensors``
    (trained on this store's grid) is applied like a probe; a file of no kind is named."""
    from napari_gpfm import pathotune as pt
    from napari_gpfm.analyses.classify import store_recipe
    from napari_gpfm.encoders import load_encoder

    viewer = make_napari_viewer()
    slide = open_slide(viewer, sample_svs)
    store = embed(qtbot, setup_gpfm(viewer, tmp_path / "project"), slide)
    w = add_dock(viewer, "annotate")
    encoder = load_encoder(store.model, allow_random=True)  # the store's random tiny backbone
    clf = pt.build_classifier(encoder, ["Tumor", "Stroma"], pt.PromptConfig(ttp=False, n_tvp=2),
                              colours=np.array([[255, 0, 0], [0, 128, 0]]))
    clf.info["tiles"] = {"patch_size_level0": store.patch_size_level0, "mpp": store.mpp,
                         "recipe": store_recipe(store)}
    path = clf.save(tmp_path / "tumour")
    with qtbot.waitSignal(w.apply_jobs.finished, timeout=60_000):
        w.load_classifier(path)
    assert w.probe.kind == "pathotune"
    classes = viewer.layers[f"{slide.name} · probe classes"]
    assert (np.asarray(classes.data) > 0).sum() == store.n_patches and not errors

    junk = tmp_path / "notes.npz"
    junk.write_text("not a classifier")
    with qtbot.waitSignal(w.apply_jobs.finished, timeout=30_000):
        w.load_classifier(junk)
    assert errors and str(junk) in errors[-1] and "not a classifier file" in errors[-1]
