"""The PathoTune dock as a user drives it: docks from the Plugins menu, embeddings from the GPFM
dock, classes and shapes from the Annotate dock, clicks on Train / Predict / Cancel."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from plugin_docks import (
    TINY,
    add_dock,
    click,
    draw_rectangle,
    embed,
    open_slide,
    setup_gpfm,
    world_rect,
    write_tiny_card,
)

OFFSET = (-300.0, 700.0)  # where the slide layer is moved to (world µm, y x)


class FakeText:
    """Deterministic stand-in for the MiniLM sentence encoder."""

    name, dim = "fake-text", 384

    def encode(self, sentences):
        rows = [np.random.default_rng(int(hashlib.sha256(s.encode()).hexdigest()[:8], 16))
                .standard_normal(384) for s in sentences]  # fmt: skip
        return np.stack(rows).astype(np.float32)


@pytest.fixture(autouse=True)
def tiny_models(tmp_path_factory, tmp_path, monkeypatch):
    import torch

    d = write_tiny_card(tmp_path_factory.getbasetemp() / "qt-models")
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
    monkeypatch.setenv("NAPARI_GPFM_FEATURES_DIR", str(tmp_path / "default-features"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention on a shared CPU
    yield d
    torch.set_num_threads(threads)


def _configure(pt, epochs=2):
    pt.random_check.setChecked(True)
    pt.text_encoder = FakeText()
    pt.n_spin.setValue(2)
    pt.epochs_spin.setValue(epochs)


def test_trains_on_the_embedded_grid_beside_the_probe(make_napari_viewer, qtbot, sample_svs,
                                                      tmp_path):  # fmt: skip
    viewer = make_napari_viewer()
    slide = open_slide(viewer, sample_svs, OFFSET)
    mpp = float(slide.scale[-1])
    pt = add_dock(viewer, "pathotune")
    assert f"{slide.name}: no embeddings" in pt.grid_label.text()
    store = embed(qtbot, setup_gpfm(viewer, tmp_path), slide)
    # the dock follows the GPFM dock's embeddings: their grid, their backbone
    assert "the embedded patches" in pt.grid_label.text()
    assert store.path.name in pt.grid_label.text()
    assert pt.model_combo.currentText() == TINY

    # classes in the (shared) palette: "lower" first; the first shape drawn is "upper"
    ann = add_dock(viewer, "annotate")
    for name in ("lower", "upper"):
        ann.class_name_edit.setText(name)
        click(qtbot, ann.add_button)
    click(qtbot, ann.new_layer_button)
    layer = ann.annotation_layer()
    c, P = store.coords, store.patch_size_level0
    ys = np.unique(c[:, 1])
    ymid, ymid2 = int(ys[len(ys) // 2]), int(ys[len(ys) // 2 + 1])
    x0, x1 = int(c[:, 0].min()), int(c[:, 0].max() + P)
    ann.set_active_class("upper")
    draw_rectangle(layer, world_rect(slide, x0, int(ys[0]), x1, ymid))
    ann.set_active_class("lower")
    draw_rectangle(layer, world_rect(slide, x0, ymid2, x1, int(ys[-1]) + P))
    assert layer.features["class"].tolist() == ["upper", "lower"]
    assert pt.shapes_combo.currentText() == layer.name

    _configure(pt)
    with qtbot.waitSignal(pt.jobs.finished, timeout=180_000) as blocker:
        click(qtbot, pt.train_button)
        assert not pt.train_button.isEnabled() and pt.cancel_button.isEnabled()
    assert blocker.args == ["done"], pt.status.text()
    res = pt.last
    # trained on the embedded grid, shapes read on the moved slide, classes in palette order
    assert res.labels.labels.shape == (store.n_patches,)
    assert res.labels.counts == {"lower": int((c[:, 1] >= ymid2).sum()),
                                 "upper": int((c[:, 1] < ymid).sum())}  # fmt: skip
    assert pt.classifier.class_names == ["lower", "upper"]
    assert res.probe_val_bal_acc is not None
    # both numbers on the same split, in a table: PathoTune's row, then the probe's
    table = pt.compare_table
    assert table.isVisibleTo(pt) and table.rowCount() == 2
    cells = [[table.item(r, c).text() for c in range(table.columnCount())] for r in range(2)]
    assert cells[1][0] == "linear probe"
    assert float(cells[1][1]) == pytest.approx(res.probe_val_bal_acc, abs=5e-4)
    assert float(cells[0][1]) == pytest.approx(res.train.val_bal_acc, abs=5e-4)
    n_val = len(res.train.val_indices)
    assert cells[0][2:4] == cells[1][2:4] == [str(res.split.n_train), str(n_val)]
    assert f"{res.n_labelled} labelled patches" in pt.scores.text()
    # the labelled patches per class and the split were listed before training
    counts = pt.counts_table
    assert [counts.item(r, 0).text() for r in range(counts.rowCount())] == ["lower", "upper"]
    assert [int(counts.item(r, 1).text()) for r in range(2)] == [res.labels.counts["lower"],
                                                                res.labels.counts["upper"]]
    qtbot.waitUntil(lambda: f"{slide.name} · PathoTune uncertainty" in viewer.layers,
                    timeout=10_000)  # painted one layer per turn of the event loop

    classes = viewer.layers[f"{slide.name} · PathoTune classes"]
    assert tuple(classes.scale) == pytest.approx((P * mpp, P * mpp))
    assert tuple(classes.translate) == pytest.approx(
        ((c[:, 1].min() + P / 2 - 0.5) * mpp + OFFSET[0],
         (c[:, 0].min() + P / 2 - 0.5) * mpp + OFFSET[1]))  # fmt: skip
    assert (np.asarray(classes.data) > 0).sum() == store.n_patches
    lower = np.array(ann.palette.colour("lower")) / 255
    assert classes.colormap.map(np.array([1]))[0, :3] == pytest.approx(lower)
    assert f"{slide.name} · PathoTune P(upper)" in viewer.layers
    assert f"{slide.name} · PathoTune uncertainty" in viewer.layers
    assert pt.session.classifiers["pathotune"] is pt.classifier
    assert "patches predicted" in pt.status.text()
    # the same-split linear probe's map beside PathoTune's, on the same grid
    probe = viewer.layers[f"{slide.name} · probe classes"]
    assert tuple(probe.translate) == pytest.approx(tuple(classes.translate))
    assert probe.data.shape == classes.data.shape
    assert (np.asarray(probe.data) > 0).sum() == store.n_patches
    g = pt.session.slide(slide).grid
    assert [probe.data[g.rows[i], g.cols[i]] - 1 for i in range(store.n_patches)] == \
        res.probe_prediction.labels.tolist()  # fmt: skip
    agree = float(np.mean(res.probe_prediction.labels == res.prediction.labels))
    assert res.agreement == pytest.approx(agree)
    assert table.item(0, 4).text() == f"{100 * agree:.1f} %"

    # Predict slide repaints with the trained classifier
    viewer.layers.remove(classes)
    with qtbot.waitSignal(pt.jobs.finished, timeout=120_000) as blocker:
        click(qtbot, pt.predict_button)
    assert blocker.args == ["done"], pt.status.text()
    assert f"{slide.name} · PathoTune classes" in viewer.layers

    path = pt.save(tmp_path / "clf")
    assert path.exists()
    with qtbot.waitSignal(pt.jobs.finished, timeout=60_000):  # a job: the backbone is built
        assert pt.load(path) is not None
    assert "loaded clf.safetensors" in pt.scores.text()
    # the one loader reads a linear probe too, but this dock predicts pixels: refused, pointed on
    from napari_gpfm.analyses.probe import fit_probe

    probe = fit_probe(np.eye(4, dtype=np.float32), [0, 1, 0, 1], ["a", "b"]).save(
        tmp_path / "probe.npz")
    with qtbot.waitSignal(pt.jobs.finished, timeout=60_000):
        pt.load(probe)
    assert "Annotate dock" in pt.status.text()
    assert pt.classifier is not None and pt.classifier.kind == "pathotune"


def test_too_few_classes_is_shown_and_cancel_stops_training(make_napari_viewer, qtbot,
                                                            sample_svs):  # fmt: skip
    from napari_gpfm.layers.annotation_layers import set_class_of

    viewer = make_napari_viewer()
    slide = open_slide(viewer, sample_svs)
    mpp = float(slide.scale[-1])
    pt = add_dock(viewer, "pathotune")
    assert "no embeddings" in pt.grid_label.text()  # PathoTune tiles the slide itself
    # the user's own Shapes layer (µm), one class only
    top = np.array([[0, 0], [0, 2220], [1300, 2220], [1300, 0]], float) * mpp
    bottom = np.array([[1500, 0], [1500, 2220], [2967, 2220], [2967, 0]], float) * mpp
    shapes = viewer.add_shapes([top], shape_type="polygon", name="mine",
                               features={"class": np.array(["upper"], dtype=object)})
    assert pt.shapes_combo.currentText() == "mine"
    _configure(pt, epochs=500)
    pt.val_spin.setValue(0.0)

    with qtbot.waitSignal(pt.jobs.finished, timeout=120_000) as blocker:
        click(qtbot, pt.train_button)
    assert blocker.args == ["error"]
    assert "at least two classes" in pt.status.text() and "upper" in pt.status.text()
    assert pt.train_button.isEnabled() and not pt.cancel_button.isEnabled()

    shapes.add_polygons([bottom])
    set_class_of(shapes, [1], "lower")
    click(qtbot, pt.train_button)

    def training():
        p = pt.jobs.last_progress
        return p is not None and p.stage == "training" and p.status == "running"

    qtbot.waitUntil(training, timeout=120_000)
    click(qtbot, pt.cancel_button)
    qtbot.waitUntil(lambda: not pt.jobs.busy, timeout=30_000)
    assert pt.jobs.last_progress.done < 20  # stopped within a few steps of 500 epochs
    assert pt.classifier is None and "ancel" in pt.status.text()
    assert f"{slide.name} · PathoTune classes" not in viewer.layers
    assert pt.train_button.isEnabled() and not pt.cancel_button.isEnabled()
