"""The GPFM dock end to end on the sample slide with a tiny random ViT."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from gpfm_helpers import TINY, add_slide, make_widget, write_tiny_card

MPP = 0.499


@pytest.fixture(autouse=True)
def tiny_models(tmp_path_factory, monkeypatch):
    d = write_tiny_card(tmp_path_factory.getbasetemp() / "qt-models")
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
    return d


def _run(qtbot, widget, expect="done", timeout=60_000):
    with qtbot.waitSignal(widget.run_finished, timeout=timeout) as blocker:
        assert widget.compute() is not None, widget.status.text()
    assert blocker.args == [expect], widget.status.text()


def test_embed_cluster_click_export(make_napari_viewer, qtbot, sample_svs, tmp_path):
    viewer = make_napari_viewer()
    other = add_slide(viewer, sample_svs)  # a second open slide (same file: same store)
    layer = add_slide(viewer, sample_svs)
    assert other.name != layer.name
    w = make_widget(viewer, tmp_path)
    w.layer_combo.setCurrentText(layer.name)
    assert "(not GPFM)" in w.model_combo.currentText()
    assert "weights missing" in w.model_combo.currentText()

    # preview: tissue mask and patch grid layers, patch count before any run
    with qtbot.waitSignal(viewer.layers.events.inserted, timeout=20_000):
        w.preview_tissue()
    qtbot.waitUntil(lambda: f"{layer.name} patches" in viewer.layers, timeout=20_000)
    n_preview = int(viewer.layers[f"{layer.name} patches"].metadata["napari_gpfm"]["n_patches"])
    assert f"{n_preview:,} patches" in w.status.text()

    _run(qtbot, w)
    s = w.session()
    assert s.n == n_preview and s.patch_size_level0 == round(112 * 0.5 / MPP)
    assert w.progress.value() == w.progress.maximum() == s.n

    # a second run with the same recipe loads the store without a model
    _run(qtbot, w, "loaded")

    # clusters: Labels layer aligned exactly, table sums to the patch count
    w.cluster(4)
    qtbot.waitUntil(lambda: f"{layer.name} clusters" in viewer.layers, timeout=20_000)
    lab = viewer.layers[f"{layer.name} clusters"]
    g = s.grid
    assert lab.data.shape == g.shape
    np.testing.assert_allclose(lab.scale, (g.cell * MPP,) * 2)
    np.testing.assert_allclose(lab.translate, ((g.y0 + g.cell / 2 - 0.5) * MPP,
                                               (g.x0 + g.cell / 2 - 0.5) * MPP))  # fmt: skip
    total = sum(int(w.cluster_table.item(r, 1).text().replace(",", ""))
                for r in range(w.cluster_table.rowCount()))  # fmt: skip
    assert total == s.n and w.cluster_table.rowCount() == 4

    # heatmap of the distance to the cluster centre: cell of patch i covers its footprint
    heat = w.show_heatmap("distance_to_centre")
    x, y = s.coords[7]
    P = s.patch_size_level0
    lo = heat.data_to_world((g.rows[7] - 0.5, g.cols[7] - 0.5))
    hi = heat.data_to_world((g.rows[7] + g.k - 0.5, g.cols[7] + g.k - 0.5))
    np.testing.assert_allclose(lo, ((y - 0.5) * MPP, (x - 0.5) * MPP), atol=1e-9)
    np.testing.assert_allclose(hi, ((y + P - 0.5) * MPP, (x + P - 0.5) * MPP), atol=1e-9)
    assert np.isnan(heat.data).any() and heat.colormap.nan_color[3] == 0

    # a click on patch 7 (world µm) -> similarity map peaking there, top-k listed and clickable
    res = w.handle_click(np.array(s.centre(7)) + 0.3 * P * MPP)
    assert res.query.tolist() == [7]
    sim = viewer.layers[f"{layer.name} similarity"]
    r, c = np.round(sim.world_to_data(s.centre(7))).astype(int)
    assert sim.data[r, c] == pytest.approx(np.nanmax(sim.data)) == pytest.approx(1.0)
    assert w.hits_table.rowCount() == 10 and f"{layer.name} top hits" in viewer.layers
    # every other open slide with a store of the same model gets its similarity map too
    assert set(res.scores) == {layer.name, other.name}
    assert f"{other.name} similarity" in viewer.layers
    np.testing.assert_allclose(res.scores[other.name], res.scores[layer.name], rtol=1e-5)
    w.go_to_hit(0)
    _, hit, _ = res.hits[0]
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], s.centre(hit))

    # the same through a simulated mouse click (press + release, no move)
    class Ev:
        def __init__(self, kind, pos):
            self.type, self.position, self.modifiers = kind, pos, []

    gen = w._on_mouse_drag(viewer, ev := Ev("mouse_press", s.centre(3)))
    next(gen)
    ev.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    assert w.last_result.query.tolist() == [3]

    # a Points layer as query
    viewer.add_points([s.centre(5), s.centre(6)], name="query")
    res = w.query_points("query")
    assert sorted(res.query.tolist()) == [5, 6]

    # exports read back
    files = w.export()
    names = {p.name for p in files}
    assert {f"{layer.name}_clusters.png", f"{layer.name}_patches.geojson",
            f"{layer.name}_clusters.geojson"} <= names  # fmt: skip
    table = next(p for p in files if p.stem.endswith("_patches") and p.suffix != ".geojson")
    assert table.exists() and table.stat().st_size > 0
    if table.suffix == ".csv":
        assert len(table.read_text().splitlines()) == s.n + 1


def test_cancel_then_resume_matches_uninterrupted(make_napari_viewer, qtbot, sample_svs, tmp_path):
    from napari_gpfm.embeddings import embed, open_store, partial_path, store_path
    from napari_gpfm.encoders import load_encoder

    viewer = make_napari_viewer()
    layer = add_slide(viewer, sample_svs)
    w = make_widget(viewer, tmp_path / "ui", batch_size=8)

    def cancel_on_first_batch(p):
        if getattr(p, "status", None) == "running":
            w.cancel()

    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        w.compute().yielded.connect(cancel_on_first_batch)
    assert blocker.args == ["cancelled"], w.status.text()
    assert w.cancel_latency_s < 1.0
    assert "resume" in w.status.text()
    final = store_path(tmp_path / "ui", TINY, layer.name)
    part = partial_path(final)
    assert part.exists() and not final.exists()
    with h5py.File(part, "r") as f:
        first_done, total = int(f.attrs["gpfm_n_done"]), int(f.attrs["gpfm_n_total"])
    assert 0 < first_done < total

    resumed = []
    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        w.compute().yielded.connect(lambda p: resumed.append(p))
    assert blocker.args == ["done"]
    assert resumed[0].status == "started" and resumed[0].done == first_done
    got = open_store(final)
    assert got.n_patches == total

    ref = embed(layer.metadata["napari_gpfm"]["slide"], load_encoder(TINY, allow_random=True),
                w.spec(), tmp_path / "ref", num_workers=0)  # fmt: skip
    np.testing.assert_allclose(got.features, open_store(ref).features, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.coords, open_store(ref).coords)


def test_missing_mpp_points_to_slide_info(make_napari_viewer, nompp_tif, tmp_path):
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning):
        add_slide(viewer, nompp_tif)
    w = make_widget(viewer, tmp_path)
    assert w.compute() is None
    assert "Slide info" in w.status.text() and "pixel size" in w.status.text()
