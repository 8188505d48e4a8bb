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


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """One output folder for the scenario's tests: the first run embeds, the others load."""
    return tmp_path_factory.mktemp("gpfm-dock-out")


class Docked:
    """A window with two open copies of the sample slide and the dock on the second."""

    def __init__(self, viewer, qtbot, sample_svs, out_dir):
        self.viewer, self.qtbot = viewer, qtbot
        self.other = add_slide(viewer, sample_svs)  # a second open slide (same file: same store)
        self.layer = add_slide(viewer, sample_svs)
        self.w = make_widget(viewer, out_dir)
        self.w.select_slide(self.layer)

    def embedded(self):
        """Run (embed, or load what an earlier test embedded); the slide's session state."""
        status = _run(self.qtbot, self.w)
        assert "ready" in status or "loaded" in status, status
        return self.w.session_state()

    def clustered(self, k=4):
        s = self.embedded()
        with self.qtbot.waitSignal(self.w.cluster_jobs.finished, timeout=20_000) as blocker:
            assert self.w.cluster(k) is not None, self.w.cluster_jobs.status.text()
        assert blocker.args == ["done"], self.w.cluster_jobs.status.text()
        return s

    def name(self, what):
        return result_name(self.layer.name, what)


@pytest.fixture
def docked(make_napari_viewer, qtbot, sample_svs, out_dir):
    return Docked(make_napari_viewer(), qtbot, sample_svs, out_dir)


def test_dock_picks_the_slide_and_flags_a_model_that_is_not_gpfm(docked):
    assert docked.other.name != docked.layer.name
    assert docked.w.layer_combo.currentText() == docked.layer.name
    assert "(not GPFM)" in docked.w.model_combo.currentText()
    assert "weights missing" in docked.w.model_combo.currentText()


def test_preview_counts_the_patches_the_run_then_embeds(docked, qtbot):
    w, viewer = docked.w, docked.viewer
    with qtbot.waitSignal(w.jobs.finished, timeout=20_000) as blocker:
        assert w.preview_tissue() is not None, w.status.text()
    assert blocker.args == ["done"], w.status.text()
    assert docked.name("tissue") in viewer.layers
    grid_layer = viewer.layers[docked.name("patches")]
    n_preview = int(grid_layer.metadata["napari_gpfm"]["n_patches"])
    assert n_preview > 0 and f"{n_preview:,} patches" in w.status.text()
    s = docked.embedded()
    assert s.uid == int(docked.layer.unique_id) and s.name == docked.layer.name
    assert s.n == n_preview and s.patch_size_level0 == round(112 * 0.5 / MPP)
    assert w.progress.value() == w.progress.maximum() == s.n
    assert docked.name("patches") not in viewer.layers  # once results are there, the preview goes


def test_store_lands_in_its_tiling_folder_and_a_rerun_loads_it_without_a_model(docked, out_dir):
    n = docked.embedded().n
    status = _run(docked.qtbot, docked.w)  # the same recipe again
    assert "loaded" in status and docked.w.jobs.last_progress.status == "skipped"
    s = docked.w.session_state()
    assert s.n == n
    # <out>/<tiling>/features_<model>/<slide>.h5
    assert s.store.path == out_dir / "0.5mpp_112px_0px_overlap" / f"features_{TINY}" / \
        "CMU-1-Small-Region.h5"  # fmt: skip


def test_cluster_labels_sit_on_their_patches(docked):
    s = docked.clustered()
    P, g, c = s.patch_size_level0, s.grid, s.coords
    lab = docked.viewer.layers[docked.name("clusters")]
    assert lab.data.shape == g.shape
    # no overlap: one raster cell per patch side; the first cell centred on the first patch's
    np.testing.assert_allclose(lab.scale, (P * MPP,) * 2)
    np.testing.assert_allclose(lab.translate, ((c[:, 1].min() + P / 2 - 0.5) * MPP,
                                               (c[:, 0].min() + P / 2 - 0.5) * MPP))  # fmt: skip
    # every patch's centre falls in a cell holding its cluster
    cells = np.round([lab.world_to_data(_world_centre(xy, P)) for xy in c]).astype(int)
    np.testing.assert_array_equal(lab.data[cells[:, 0], cells[:, 1]], s.clusters.labels + 1)
    assert (lab.data > 0).sum() == s.n


def _cluster_table(w):
    return [[w.cluster_table.item(r, col).text() for col in range(1, 4)]
            for r in range(w.cluster_table.rowCount())]  # fmt: skip


def test_cluster_table_counts_percentages_and_areas(docked):
    s = docked.clustered()
    rows = _cluster_table(docked.w)
    counts = [int(n.replace(",", "")) for n, _, _ in rows]
    assert len(rows) == 4 and sum(counts) == s.n
    assert counts == np.bincount(s.clusters.labels, minlength=4).tolist()
    assert sum(float(pct) for _, pct, _ in rows) == pytest.approx(100, abs=0.2)
    # areas in mm²: the patches do not overlap, so each cluster covers count × (P·mpp)²
    areas = [float(area) for _, _, area in rows]
    P = s.patch_size_level0
    np.testing.assert_allclose(areas, np.array(counts) * (P * MPP) ** 2 / 1e6, atol=1e-4)


def test_distance_heatmap_cell_covers_its_patch_footprint(docked):
    s = docked.clustered()
    P, g = s.patch_size_level0, s.grid
    heat = docked.w.show_heatmap("distance_to_centre")
    assert heat.name == docked.name("distance to centre")
    x, y = s.coords[7]
    lo = heat.data_to_world((g.rows[7] - 0.5, g.cols[7] - 0.5))
    hi = heat.data_to_world((g.rows[7] + g.k - 0.5, g.cols[7] + g.k - 0.5))
    np.testing.assert_allclose(lo, ((y - 0.5) * MPP, (x - 0.5) * MPP), atol=1e-9)
    np.testing.assert_allclose(hi, ((y + P - 0.5) * MPP, (x + P - 0.5) * MPP), atol=1e-9)
    assert np.isnan(heat.data).any() and heat.colormap.nan_color[3] == 0


def _click_patch_7(docked):
    s = docked.embedded()
    P = s.patch_size_level0
    centre7 = _world_centre(s.coords[7], P)
    np.testing.assert_allclose(s.centre(7), centre7)
    res = docked.w.handle_click(centre7 + 0.3 * P * MPP)
    assert res is not None, docked.w.status.text()
    return s, res, centre7


def test_click_maps_similarity_peaking_at_the_clicked_patch(docked):
    s, res, centre7 = _click_patch_7(docked)
    assert res.query_slide == s.uid and res.query.tolist() == [7]
    sim = docked.viewer.layers[docked.name("similarity")]
    r, cc = np.round(sim.world_to_data(centre7)).astype(int)
    assert sim.data[r, cc] == pytest.approx(np.nanmax(sim.data)) == pytest.approx(1.0)
    assert docked.w.hits_table.rowCount() == 10 and docked.name("top hits") in docked.viewer.layers


def test_click_maps_similarity_on_every_open_slide_with_a_store(docked):
    """The other slide finds the finished store of its file in the output folder."""
    s, res, _ = _click_patch_7(docked)
    other, other_uid = docked.other, int(docked.other.unique_id)
    assert set(res.scores) == {s.uid, other_uid}
    assert res.names == {s.uid: docked.layer.name, other_uid: other.name}
    assert result_name(other.name, "similarity") in docked.viewer.layers
    np.testing.assert_allclose(res.scores[other_uid], res.scores[s.uid], rtol=1e-5)


def test_hits_gallery_lists_the_hits_best_first_with_score_and_slide(docked):
    s, res, _ = _click_patch_7(docked)
    gallery = docked.w.hits_gallery
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
    assert res.scores[int(docked.other.unique_id)][7] == pytest.approx(scores[0])
    assert scores[0] == pytest.approx(1.0)


def test_go_to_hit_centres_the_camera_on_the_hit(docked):
    _, res, _ = _click_patch_7(docked)
    docked.w.go_to_hit(3)
    uid, hit, _ = res.hits[3]
    state = docked.w.session.slides[uid]
    np.testing.assert_allclose(docked.viewer.scene.camera.center[-2:],
                               _world_centre(state.coords[hit], state.patch_size_level0))


def test_a_mouse_click_without_a_drag_queries_the_patch(docked):
    s = docked.embedded()

    class Ev:  # a press then a release at the same place, no move
        def __init__(self, kind, pos):
            self.type, self.position, self.modifiers = kind, pos, []

    ev = Ev("mouse_press", _world_centre(s.coords[3], s.patch_size_level0))
    gen = docked.w._on_mouse_drag(docked.viewer, ev)
    next(gen)
    ev.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    # the click does not wait: the similarity index may still be building
    docked.qtbot.waitUntil(lambda: docked.w.last_result is not None, timeout=20_000)
    assert docked.w.last_result.query.tolist() == [3]


def test_a_points_layer_queries_the_patches_under_its_points(docked):
    s = docked.embedded()
    P = s.patch_size_level0
    docked.viewer.add_points([_world_centre(s.coords[5], P), _world_centre(s.coords[6], P)],
                             name="query")  # fmt: skip
    res = docked.w.query_points("query")
    assert res is not None, docked.w.status.text()
    assert sorted(res.query.tolist()) == [5, 6]


def test_exports_read_back(docked, out_dir):
    from napari_gpfm.annotations.geojson import read_geojson

    s = docked.clustered()
    name = docked.layer.name
    files = docked.w.export()
    assert all(p.parent == out_dir / "exports" for p in files)
    assert {f"{name}_clusters.png", f"{name}_patches.geojson",
            f"{name}_clusters.geojson"} <= {p.name for p in files}  # fmt: skip
    table = next(p for p in files if p.stem.endswith("_patches") and p.suffix != ".geojson")
    assert table.exists() and table.stat().st_size > 0
    if table.suffix == ".csv":
        assert len(table.read_text().splitlines()) == s.n + 1
    assert len(read_geojson(out_dir / "exports" / f"{name}_patches.geojson")) == s.n
    merged = read_geojson(out_dir / "exports" / f"{name}_clusters.geojson")
    counts = np.bincount(s.clusters.labels, minlength=4).tolist()
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


def test_precision_choice_reaches_the_store_and_its_recipe(docked, out_dir):
    w = docked.w
    assert [w.precision_combo.itemText(i) for i in range(w.precision_combo.count())] == \
        ["auto", "fp32", "fp16", "bf16"]  # fmt: skip
    assert w.precision_combo.currentText() == "auto"
    assert docked.embedded().store.precision == "fp32"  # auto on the CPU
    w.precision_combo.setCurrentText("bf16")
    asked = []
    w.confirm_overwrite = lambda q: asked.append(q) or False
    with docked.qtbot.waitSignal(w.run_finished, timeout=60_000):
        assert w.compute() is not None
    (question,) = asked  # the fp32 store at that path is not a bf16 store: replace it?
    assert str(docked.w.session_state().store.path) in question
    assert "computed in fp32 but this run asks for bf16" in question, question
    assert "Kept it" in w.status.text()


def test_choosing_a_model_shows_its_cards_tiling(make_napari_viewer):
    from napari_gpfm._qt.gpfm_widget import GPFMWidget

    w = GPFMWidget(make_napari_viewer(), allow_random=True)
    w.set_model("gpfm")  # its authors' field: 512 px at 0.25 µm/px, resized to 224
    assert w.preset_combo.currentText() == "gpfm-40x-512to224"
    assert (w.mpp_spin.value(), w.size_spin.value()) == (0.25, 512)
    assert w.spec().field_um == 128
    w.set_model(TINY)  # 112 px at 0.5 µm/px: no preset has it
    assert w.preset_combo.currentText() == "custom"
    assert (w.mpp_spin.value(), w.size_spin.value()) == (0.5, 112)
    w.set_model("gpfm-demo-student-vit-ti14")  # the demo's tiling is TRIDENT's
    assert w.preset_combo.currentText() == "gpfm-20x-224"
