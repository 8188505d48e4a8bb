"""The 'Annotate & classify' dock: palette, shapes, live retraining, GeoJSON, classifier files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_gpfm._qt import annotate_widget as aw
from napari_gpfm._qt.annotate_widget import AnnotateWidget
from tiny_models import tiny_card

TINY_CARD = tiny_card("tiny-test", 112)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, sample_svs):
    """Real feature stores (tiny random ViT) of the sample slide and of a copy named 'other'."""
    import shutil

    import torch

    from napari_gpfm.embeddings import embed
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.tiles import TissueParams

    d = tmp_path_factory.mktemp("models")
    (d / "tiny-test.yaml").write_text(TINY_CARD)
    out = tmp_path_factory.mktemp("project")
    other = shutil.copy(sample_svs, tmp_path_factory.mktemp("other") / "other.svs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
        torch.set_num_threads(1)
        enc = load_encoder("tiny-test", allow_random=True)
        kw = dict(tissue_params=TissueParams(thumbnail_max_side=512), num_workers=0,
                  batch_size=64)
        yield {"sample": embed(sample_svs, enc, None, out, **kw),
               "other": embed(other, enc, None, out, **kw), "project": out, "other_svs": other}


@pytest.fixture
def errors(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(aw, "show_error", seen.append)
    monkeypatch.setattr(aw, "show_info", lambda m: None)
    return seen


def _rect_world(x0, y0, x1, y1, mpp):
    """A napari rectangle (data = level-0 px centres, layer scale mpp) for level-0 [x0,x1)×[y0,y1)."""
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float) - 0.5


def _widget(viewer, stores, sample_svs):
    (slide,) = viewer.open(str(sample_svs), plugin="napari-gpfm")
    w = AnnotateWidget(viewer)
    w.set_store(stores["sample"])
    assert w.store().n_patches > 20
    for name in ("Tumor", "Stroma"):  # a palette saved with the project is loaded back
        if name not in w.palette:
            w.add_class(name)
    return slide, w


def test_live_loop_retrains_after_a_shape_is_added(make_napari_viewer, qtbot, stores,
                                                    sample_svs, errors):
    viewer = make_napari_viewer()
    slide, w = _widget(viewer, stores, sample_svs)
    store = w.store()
    c, P, mpp = store.coords, store.patch_size_level0, store.mpp
    layer = w.new_annotation_layer()
    assert tuple(layer.scale) == pytest.approx((mpp, mpp))
    xs = np.sort(np.unique(c[:, 0]))
    lo, hi = xs[len(xs) // 3], xs[2 * len(xs) // 3]
    y0, y1 = c[:, 1].min(), c[:, 1].max() + P
    w.live_check.setChecked(True)
    w.set_active_class("Tumor")
    layer.add_rectangles(_rect_world(c[:, 0].min(), y0, lo, y1, mpp))
    qtbot.wait(50)
    assert layer.features["class"].tolist() == ["Tumor"]
    # one class only: the widget says what is missing, no map yet
    qtbot.waitUntil(lambda: "two classes" in w.status_label.text(), timeout=10_000)
    w.set_active_class("Stroma")
    layer.add_rectangles(_rect_world(hi, y0, c[:, 0].max() + P, y1, mpp))  # the edit
    qtbot.waitUntil(lambda: "balanced accuracy" in w.accuracy_label.text(), timeout=20_000)
    qtbot.waitUntil(lambda: not w.busy, timeout=10_000)
    assert not errors
    assert np.allclose(layer.edge_color[1, :3], np.array(w.palette.colour("Stroma")) / 255)
    assert "Tumor" in w.status_label.text() and "Stroma" in w.status_label.text()
    assert w.table.rowCount() == 2 and w.table.columnCount() == 3
    assert w.table.item(0, 2).text() not in ("", "-")

    cmap = viewer.layers["CMU-1-Small-Region classes"]
    assert type(cmap).__name__ == "Labels"
    assert tuple(cmap.scale) == pytest.approx((P * mpp, P * mpp))
    assert tuple(cmap.translate) == pytest.approx(((c[:, 1].min() + P / 2 - 0.5) * mpp,
                                                   (c[:, 0].min() + P / 2 - 0.5) * mpp))
    assert (np.asarray(cmap.data) > 0).sum() == store.n_patches
    assert cmap.colormap.map(np.array([1]))[0, :3] == pytest.approx(np.array([200, 0, 0]) / 255)
    p = viewer.layers["CMU-1-Small-Region P(Tumor)"]
    assert np.isnan(p.data[np.asarray(cmap.data) == 0]).all()
    assert "CMU-1-Small-Region uncertainty" in viewer.layers

    # a class change on a shape retrains too (features event)
    acc_before = w.report
    from napari_gpfm.layers.annotation_layers import set_class_of

    layer.add_rectangles(_rect_world(lo, y0, lo + P, y0 + P, mpp))
    set_class_of(layer, [2], "Stroma")
    qtbot.waitUntil(lambda: w.report is not acc_before and not w.busy, timeout=20_000)
    assert w.labels.counts["Stroma"] >= 1

    # classes persist with the project
    saved = json.loads((stores["project"] / "classes.json").read_text())
    assert [c["name"] for c in saved["classes"]] == ["Tumor", "Stroma"]


def test_geojson_round_trip_and_classifier_files(make_napari_viewer, qtbot, stores, sample_svs,
                                                 tmp_path, errors):
    viewer = make_napari_viewer()
    slide, w = _widget(viewer, stores, sample_svs)
    store = w.store()
    c, P = store.coords, store.patch_size_level0
    xs = np.sort(np.unique(c[:, 0]))
    lo, hi = int(xs[len(xs) // 3]), int(xs[2 * len(xs) // 3])
    y0, y1 = int(c[:, 1].min()), int(c[:, 1].max() + P)
    mid = c[(c[:, 0] > lo + P) & (c[:, 0] + P < hi)]
    ix, iy = (int(v) for v in mid[len(mid) // 2])  # one patch, all Ignore*
    qupath = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "t1", "geometry": {"type": "Polygon", "coordinates": [
            [[int(c[:, 0].min()), y0], [lo, y0], [lo, y1], [int(c[:, 0].min()), y1],
             [int(c[:, 0].min()), y0]],
            [[lo - 50, y0 + 10], [lo - 20, y0 + 10], [lo - 20, y0 + 40.5], [lo - 50, y0 + 10]]]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Tumor", "color": [255, 0, 0]}}},
        {"type": "Feature", "id": "s1", "geometry": {"type": "MultiPolygon", "coordinates": [
            [[[hi, y0], [int(c[:, 0].max() + P), y0], [int(c[:, 0].max() + P), y1], [hi, y1],
              [hi, y0]]],
            [[[lo, y0], [lo + 30, y0], [lo + 30, y0 + 30], [lo, y0]]]]},
         "properties": {"objectType": "annotation", "name": "stroma",
                        "classification": {"name": "Stroma", "color": [0, 128, 0]}}},
        {"type": "Feature", "id": "i1", "geometry": {"type": "Polygon", "coordinates": [
            [[ix, iy], [ix + P, iy], [ix + P, iy + P], [ix, iy + P], [ix, iy]]]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Ignore*", "color": [180, 180, 180]}}},
    ]}
    src = tmp_path / "qupath.geojson"
    src.write_text(json.dumps(qupath))
    layer = w.import_geojson(src)
    assert w.palette.colour("Tumor") == (255, 0, 0)  # the file's colours win
    assert len(layer.data) == 4
    out = tmp_path / "back.geojson"
    w.export_geojson(out)
    assert json.loads(out.read_text()) == qupath

    w.retrain()
    qtbot.waitUntil(lambda: w.report is not None and not w.busy, timeout=20_000)
    assert w.labels.ignored.any() and w.labels.excluded_classes == ["Ignore*"]
    clf = w.save_classifier(tmp_path / "tumour.npz")

    # apply the saved classifier to another open slide from the widget
    (other,) = viewer.open(str(stores["other_svs"]), plugin="napari-gpfm")
    w2 = AnnotateWidget(viewer)
    w2.set_store(stores["other"], other)
    w2.slide_combo.setCurrentText(other.name)
    assert w2.load_classifier(clf) is not None
    assert "other classes" in viewer.layers
    viewer.layers.remove("other classes")
    assert w2.apply_to_open_slides() == 2 and "other classes" in viewer.layers

    # a classifier of another recipe is refused with an error notification
    from napari_gpfm.analyses.probe import load_probe

    bad = load_probe(clf)
    bad.recipe = dict(bad.recipe, model="gpfm", weights_sha256="f" * 64)
    bad.save(tmp_path / "bad.npz")
    assert w2.load_classifier(tmp_path / "bad.npz") is None
    assert errors and "another model or recipe" in errors[-1] and "gpfm" in errors[-1]
    assert "another model or recipe" in w2.status_label.text()
