"""The GPFM dock end to end on the sample slide with a tiny random ViT."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from gpfm_helpers import TINY, add_slide, make_widget, write_tiny_card

from napari_gpfm.layers.session import result_name

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
    return widget.status.text()


def _world_centre(coord, P):
    """World (y, x) µm of the centre of the patch at level-0 top-left ``coord`` (x, y): pixel
    centres sit at integer coordinates, as napari draws images."""
    x, y = coord
    return np.array(((y + P / 2 - 0.5) * MPP, (x + P / 2 - 0.5) * MPP))


def test_embed_cluster_click_export(make_napari_viewer, qtbot, sample_svs, tmp_path):
    viewer = make_napari_viewer()
    other = add_slide(viewer, sample_svs)  # a second open slide (same file: same store)
    layer = add_slide(viewer, sample_svs)
    assert other.name != layer.name
    w = make_widget(viewer, tmp_path)
    w.select_slide(layer)
    assert w.layer_combo.currentText() == layer.name
    assert "(not GPFM)" in w.model_combo.currentText()
    assert "weights missing" in w.model_combo.currentText()

    # preview: tissue mask and patch grid layers, patch count before any run
    with qtbot.waitSignal(w.jobs.finished, timeout=20_000) as blocker:
        assert w.preview_tissue() is not None, w.status.text()
    assert blocker.args == ["done"], w.status.text()
    assert result_name(layer.name, "tissue") in viewer.layers
    grid_layer = viewer.layers[result_name(layer.name, "patches")]
    n_preview = int(grid_layer.metadata["napari_gpfm"]["n_patches"])
    assert n_preview > 0 and f"{n_preview:,} patches" in w.status.text()

    status = _run(qtbot, w)
    assert "ready" in status
    s = w.session_state()
    assert s.uid == int(layer.unique_id) and s.name == layer.name
    P = s.patch_size_level0
    assert s.n == n_preview and P == round(112 * 0.5 / MPP)
    assert w.progress.value() == w.progress.maximum() == s.n
    # the store: <out>/<tiling>/features_<model>/<slide>.h5
    assert s.store.path == tmp_path / "0.5mpp_112px_0px_overlap" / f"features_{TINY}" / \
        "CMU-1-Small-Region.h5"  # fmt: skip
    # once results are there, the preview goes
    assert result_name(layer.name, "patches") not in viewer.layers

    # a second run with the same recipe loads the store without a model
    status = _run(qtbot, w)
    assert "loaded" in status and w.jobs.last_progress.status == "skipped"
    s = w.session_state()
    assert s.n == n_preview

    # clusters: Labels layer aligned exactly, table sums to the patch count
    with qtbot.waitSignal(w.cluster_jobs.finished, timeout=20_000) as blocker:
        assert w.cluster(4) is not None, w.cluster_jobs.status.text()
    assert blocker.args == ["done"], w.cluster_jobs.status.text()
    lab = viewer.layers[result_name(layer.name, "clusters")]
    g = s.grid
    c = s.coords
    assert lab.data.shape == g.shape
    # no overlap: one raster cell per patch side; the first cell centred on the first patch's
    np.testing.assert_allclose(lab.scale, (P * MPP,) * 2)
    np.testing.assert_allclose(lab.translate, ((c[:, 1].min() + P / 2 - 0.5) * MPP,
                                               (c[:, 0].min() + P / 2 - 0.5) * MPP))  # fmt: skip
    # every patch's centre falls in a cell holding its cluster
    cells = np.round([lab.world_to_data(_world_centre(xy, P)) for xy in c]).astype(int)
    np.testing.assert_array_equal(lab.data[cells[:, 0], cells[:, 1]], s.clusters.labels + 1)
    assert (lab.data > 0).sum() == s.n
    counts = [int(w.cluster_table.item(r, 1).text().replace(",", ""))
              for r in range(w.cluster_table.rowCount())]  # fmt: skip
    assert w.cluster_table.rowCount() == 4 and sum(counts) == s.n
    assert counts == np.bincount(s.clusters.labels, minlength=4).tolist()
    pcts = [float(w.cluster_table.item(r, 2).text()) for r in range(4)]
    assert sum(pcts) == pytest.approx(100, abs=0.2)
    # areas in mm²: the patches do not overlap, so each cluster covers count × (P·mpp)²
    areas = [float(w.cluster_table.item(r, 3).text()) for r in range(4)]
    np.testing.assert_allclose(areas, np.array(counts) * (P * MPP) ** 2 / 1e6, atol=1e-4)

    # heatmap of the distance to the cluster centre: cell of patch i covers its footprint
    heat = w.show_heatmap("distance_to_centre")
    assert heat.name == result_name(layer.name, "distance to centre")
    x, y = s.coords[7]
    lo = heat.data_to_world((g.rows[7] - 0.5, g.cols[7] - 0.5))
    hi = heat.data_to_world((g.rows[7] + g.k - 0.5, g.cols[7] + g.k - 0.5))
    np.testing.assert_allclose(lo, ((y - 0.5) * MPP, (x - 0.5) * MPP), atol=1e-9)
    np.testing.assert_allclose(hi, ((y + P - 0.5) * MPP, (x + P - 0.5) * MPP), atol=1e-9)
    assert np.isnan(heat.data).any() and heat.colormap.nan_color[3] == 0

    # a click on patch 7 (world µm) -> similarity map peaking there, top-k listed and clickable
    centre7 = _world_centre(s.coords[7], P)
    np.testing.assert_allclose(s.centre(7), centre7)
    res = w.handle_click(centre7 + 0.3 * P * MPP)
    assert res is not None, w.status.text()
    assert res.query_slide == s.uid and res.query.tolist() == [7]
    sim = viewer.layers[result_name(layer.name, "similarity")]
    r, cc = np.round(sim.world_to_data(centre7)).astype(int)
    assert sim.data[r, cc] == pytest.approx(np.nanmax(sim.data)) == pytest.approx(1.0)
    assert w.hits_table.rowCount() == 10 and result_name(layer.name, "top hits") in viewer.layers
    # every other open slide with a store of the same model gets its similarity map too (it
    # finds the finished store of its file in the output folder)
    other_uid = int(other.unique_id)
    assert set(res.scores) == {s.uid, other_uid}
    assert res.names == {s.uid: layer.name, other_uid: other.name}
    assert result_name(other.name, "similarity") in viewer.layers
    np.testing.assert_allclose(res.scores[other_uid], res.scores[s.uid], rtol=1e-5)
    # the gallery shows the hits, best first, captioned with score and slide name
    gallery = w.hits_gallery
    assert gallery.count() == len(res.hits)
    for row, (uid, idx, score) in enumerate(res.hits):
        t = gallery.tiles[row]
        assert (t.uid, t.index) == (uid, idx) and t.score == pytest.approx(score)
        score_line, name_line = gallery.item(row).text().split("\n")
        assert score_line.split()[0] == f"#{row + 1}"
        assert float(score_line.split()[1]) == pytest.approx(score, abs=1e-3)
        assert name_line == res.names[uid]
        assert f"patch: {idx}" in gallery.item(row).toolTip()
    # best first; the query patch itself is not a hit, the same patch of the other
    # (identical) slide scores as high as any (the tiny random model ties many patches)
    scores = [sc for _, _, sc in res.hits]
    assert scores == sorted(scores, reverse=True) and (s.uid, 7) not in [h[:2] for h in res.hits]
    assert res.scores[other_uid][7] == pytest.approx(scores[0]) == pytest.approx(1.0)
    w.go_to_hit(3)
    uid, hit, _ = res.hits[3]
    hit_coord = w.session.slides[uid].coords[hit]
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], _world_centre(hit_coord, P))

    # the same through a simulated mouse click (press + release, no move)
    class Ev:
        def __init__(self, kind, pos):
            self.type, self.position, self.modifiers = kind, pos, []

    gen = w._on_mouse_drag(viewer, ev := Ev("mouse_press", _world_centre(s.coords[3], P)))
    next(gen)
    ev.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    assert w.last_result.query.tolist() == [3]

    # a Points layer as query
    viewer.add_points([_world_centre(s.coords[5], P), _world_centre(s.coords[6], P)],
                      name="query")  # fmt: skip
    res = w.query_points("query")
    assert res is not None, w.status.text()
    assert sorted(res.query.tolist()) == [5, 6]

    # exports read back
    files = w.export()
    assert all(p.parent == tmp_path / "exports" for p in files)
    names = {p.name for p in files}
    assert {f"{layer.name}_clusters.png", f"{layer.name}_patches.geojson",
            f"{layer.name}_clusters.geojson"} <= names  # fmt: skip
    table = next(p for p in files if p.stem.endswith("_patches") and p.suffix != ".geojson")
    assert table.exists() and table.stat().st_size > 0
    if table.suffix == ".csv":
        lines = table.read_text().splitlines()
        assert len(lines) == s.n + 1
    from napari_gpfm.annotations.geojson import read_geojson

    assert len(read_geojson(tmp_path / "exports" / f"{layer.name}_patches.geojson")) == s.n
    merged = read_geojson(tmp_path / "exports" / f"{layer.name}_clusters.geojson")
    assert sorted(a.properties["measurements"]["patches"] for a in merged) == sorted(counts)


def test_cancel_then_resume_matches_uninterrupted(make_napari_viewer, qtbot, sample_svs, tmp_path):
    from napari_gpfm.embeddings import embed, open_store, partial_path, store_path
    from napari_gpfm.embeddings.store import tiling_dir_name
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.layers.reader import layer_slide

    viewer = make_napari_viewer()
    layer = add_slide(viewer, sample_svs)
    w = make_widget(viewer, tmp_path / "ui", batch_size=8)

    def cancel_on_first_batch(p):
        if p.stage == "embedding" and p.status == "running":
            w.cancel()

    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        w.compute().yielded.connect(cancel_on_first_batch)
    assert blocker.args == ["cancelled"], w.status.text()
    assert "resume" in w.status.text()
    assert w.compute_button.isEnabled() and not w.cancel_button.isEnabled()
    assert not w.session_state().has_store
    tiling = tiling_dir_name(0.5, 112, 0)
    assert tiling == "0.5mpp_112px_0px_overlap"
    final = store_path(tmp_path / "ui", TINY, "CMU-1-Small-Region", tiling)
    part = partial_path(final)
    assert part.exists() and not final.exists()
    with h5py.File(part, "r") as f:
        first_done, total = int(f.attrs["gpfm_n_done"]), int(f.attrs["gpfm_n_total"])
    assert 0 < first_done < total
    assert f"{first_done:,} / {total:,} patches kept" in w.status.text()

    resumed = []
    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        w.compute().yielded.connect(resumed.append)
    assert blocker.args == ["done"], w.status.text()
    embedding = [p for p in resumed if p.stage == "embedding"]
    assert embedding[0].status == "started" and embedding[0].done == first_done
    assert "resuming" in embedding[0].message
    got = open_store(final)
    assert got.n_patches == total
    assert w.session_state().store.path == final

    ref = embed(layer_slide(layer), load_encoder(TINY, allow_random=True), w.spec(),
                tmp_path / "ref", num_workers=0)  # fmt: skip
    np.testing.assert_allclose(got.features, open_store(ref).features, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.coords, open_store(ref).coords)


def test_missing_mpp_points_to_slide_info(make_napari_viewer, nompp_tif, tmp_path):
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning):
        add_slide(viewer, nompp_tif)
    w = make_widget(viewer, tmp_path)
    assert w.compute() is None
    assert "Slide info" in w.status.text() and "pixel size" in w.status.text()
    assert w.preview_tissue() is None and "Slide info" in w.status.text()
    assert not w.jobs.busy and w.compute_button.isEnabled()
