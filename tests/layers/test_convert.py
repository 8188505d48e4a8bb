"""Analysis results -> napari layers: geometry, colours, and the window's session."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_gpfm.analyses.heatmap import heatmap_raster, labels_raster, patch_grid
from napari_gpfm.embeddings.store import FeatureStore
from napari_gpfm.layers import convert

MPP = 0.499


def _grid_coords(x0=37, y0=11, stride=64, rows=6, cols=8, drop=(3, 7, 17, 30)):
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = np.stack([x0 + xs.ravel() * stride, y0 + ys.ravel() * stride], 1).astype(np.int64)
    return np.delete(coords, list(drop), axis=0)


def _store(coords, psize, n_dim=16, seed=0, model="tiny"):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, n_dim)) * 3
    lab = rng.integers(0, 4, len(coords))
    feats = (centres[lab] + rng.normal(size=(len(coords), n_dim))).astype(np.float32)
    attrs = {"gpfm_model": model, "gpfm_mpp": MPP, "patch_size_level0": psize, "name": "s"}
    return FeatureStore(path=Path("s.h5"), kind="gpfm", coords=coords, attrs=attrs,
                        _features=feats)  # fmt: skip


def _cell_world_extent(layer, rows, cols):
    """World [y0, y1) x [x0, x1) covered by raster cells rows x cols (pixel-centre convention)."""
    lo = layer.data_to_world((rows[0] - 0.5, cols[0] - 0.5))
    hi = layer.data_to_world((rows[-1] + 0.5, cols[-1] + 0.5))
    return np.array([lo[0], hi[0], lo[1], hi[1]])


@pytest.mark.parametrize("psize,stride", [(64, 64), (128, 64)])
def test_heatmap_cells_cover_patch_footprints(psize, stride):
    coords = _grid_coords(stride=stride)
    values = np.arange(len(coords), dtype=float)
    raster = heatmap_raster(values, coords, psize, MPP)
    data, kwargs, kind = convert.heatmap_layer_data(raster, "h", opacity=0.5)
    assert kind == "image" and data.dtype == np.float32
    vm = ViewerModel()
    layer = vm.add_image(data, **kwargs)
    assert layer.interpolation2d == "nearest" and layer.opacity == 0.5
    assert tuple(layer.units) == ("micrometer", "micrometer") or str(layer.units[0]) == "micrometer"
    g = raster.grid
    boxes = convert.patch_boxes_world(coords, psize, MPP)
    for i, (x, y) in enumerate(coords):
        r, c = g.rows[i], g.cols[i]
        ext = _cell_world_extent(layer, [r, r + g.k - 1], [c, c + g.k - 1])
        want = np.array([(y - 0.5) * MPP, (y + psize - 0.5) * MPP,
                         (x - 0.5) * MPP, (x + psize - 0.5) * MPP])  # fmt: skip
        np.testing.assert_allclose(ext, want, atol=1e-9)
        np.testing.assert_allclose(boxes[i, 0], want[[0, 2]], atol=1e-9)
        np.testing.assert_allclose(boxes[i, 2], want[[1, 3]], atol=1e-9)
    # non-tissue cells are NaN and the colormap draws NaN transparent
    assert np.isnan(data).any()
    assert layer.colormap.nan_color[3] == 0
    assert np.isfinite(layer.contrast_limits).all()


def test_heatmap_world_value_at_patch_centre_is_its_value():
    coords = _grid_coords()
    raster = heatmap_raster(np.arange(len(coords), dtype=float), coords, 64, MPP)
    data, kwargs, _ = convert.heatmap_layer_data(raster, "h")
    layer = ViewerModel().add_image(data, **kwargs)
    for i in (0, 5, len(coords) - 1):
        cy, cx = convert.patch_centre_world(coords[i], 64, MPP)
        r, c = np.round(layer.world_to_data((cy, cx))).astype(int)
        assert layer.data[r, c] == i


def test_labels_layer_colours_and_geometry():
    coords = _grid_coords()
    labels = np.arange(len(coords)) % 3
    raster = labels_raster(labels, coords, 64, MPP)
    data, kwargs, kind = convert.labels_layer_data(raster, "c", colours=convert.cluster_colours(3))
    layer = ViewerModel().add_labels(data, **kwargs)
    # napari maps (u)int8/16 labels as they are; int32 ones through a numba mapping compiled
    # on first use (1.5–2 s with the window frozen)
    assert kind == "labels" and layer.data.dtype == np.uint8
    np.testing.assert_allclose(layer.scale, raster.scale)
    np.testing.assert_allclose(layer.translate, raster.translate)
    for lab in range(3):
        np.testing.assert_allclose(layer.colormap.map(lab + 1)[:3], convert.CLUSTER_COLOURS[lab],
                                   atol=1e-6)  # fmt: skip
    assert layer.colormap.map(0)[3] == 0


def test_labels_layers_use_the_smallest_unsigned_dtype():
    coords = _grid_coords()
    for k, dtype in ((3, np.uint8), (255, np.uint8), (256, np.uint16)):
        labels = np.arange(len(coords)) % k
        labels[0] = k - 1
        data, _, _ = convert.labels_layer_data(labels_raster(labels, coords, 64, MPP), "c")
        assert data.dtype == dtype and int(data.max()) == k
    bad = labels_raster(np.zeros(len(coords), int), coords, 64, MPP)
    bad.data[0, 0] = -3
    with pytest.raises(ValueError, match="negative"):
        convert.labels_layer_data(bad, "c")


def test_tissue_layer_aligns_mask_pixels_with_level0():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:7] = True
    d = 16.0
    data, kwargs, _ = convert.tissue_layer_data(mask, d, MPP, "t")
    layer = ViewerModel().add_labels(data, **kwargs)
    # mask pixel (2, 3) stands for level-0 pixels y 32..47, x 48..63
    lo = layer.data_to_world((2 - 0.5, 3 - 0.5))
    np.testing.assert_allclose(lo, ((32 - 0.5) * MPP, (48 - 0.5) * MPP))


def test_upsert_updates_in_place():
    vm = ViewerModel()
    coords = _grid_coords()
    r1 = heatmap_raster(np.ones(len(coords)), coords, 64, MPP)
    a = convert.upsert_layer(vm, convert.heatmap_layer_data(r1, "h"))
    r2 = heatmap_raster(np.arange(len(coords), dtype=float), coords, 64, MPP)
    b = convert.upsert_layer(vm, convert.heatmap_layer_data(r2, "h", colormap="magma"))
    assert a is b and len(vm.layers) == 1
    assert np.nanmax(b.data) == len(coords) - 1 and b.colormap.name == "magma"


def _open(viewer, path):
    """File > Open with napari-gpfm's reader; returns the slide layer."""
    layers = viewer.open(str(path), plugin="napari-gpfm")
    assert len(layers) == 1
    return layers[0]


def test_session_click_similarity_clusters_and_export(make_napari_viewer, sample_svs, tmp_path,
                                                      monkeypatch):  # fmt: skip
    import shutil

    from napari_gpfm.jobs.cluster import cluster_job
    from napari_gpfm.layers.session import result_name, session_for

    monkeypatch.setenv("NAPARI_GPFM_FEATURES_DIR", str(tmp_path / "features"))
    viewer = make_napari_viewer()
    layers = {}
    for name in ("s", "t", "o"):  # three slide layers named s, t and o
        shutil.copy(sample_svs, tmp_path / f"{name}.svs")
        layers[name] = _open(viewer, tmp_path / f"{name}.svs")
    assert [la.name for la in layers.values()] == ["s", "t", "o"]
    session = session_for(viewer)
    # slides are keyed by their layer's unique_id (napari's UUID, as an int)
    assert set(session.slides) == {int(la.unique_id) for la in layers.values()}

    coords = _grid_coords()
    s = session.attach_store("s", _store(coords, 64))
    t = session.attach_store(layers["t"], _store(coords, 64, seed=1))
    o = session.attach_store(int(layers["o"].unique_id), _store(coords, 64, model="uni"))
    assert s.mpp == pytest.approx(MPP)  # the slide's own pixel size
    assert layers["s"].metadata["napari_gpfm"]["results"]["n_patches"] == len(coords)

    # a click at each patch centre finds that patch; a click off the grid finds none
    centres = np.array([s.centre(i) for i in range(s.n)])
    x, y = coords[7]
    np.testing.assert_allclose(centres[7], ((y + 32 - 0.5) * MPP, (x + 32 - 0.5) * MPP))
    np.testing.assert_array_equal(s.patch_at(centres), np.arange(s.n))
    assert s.patch_at((-100.0, -100.0)) == -1

    # similarity to patch 7: every slide of the same model, none of another model
    res = session.similarity("s", s.patch_at(centres[7]), k=5)
    assert set(res.scores) == {s.uid, t.uid} and o.uid not in res.scores
    assert res.names == {s.uid: "s", t.uid: "t"}
    assert int(np.argmax(res.scores[s.uid])) == 7
    assert res.scores[s.uid][7] == pytest.approx(1.0)
    assert len(res.hits) == 5 and (s.uid, 7) not in [(u, i) for u, i, _ in res.hits]
    shown = session.show_similarity(res)
    heat = viewer.layers[result_name("s", "similarity")]
    assert heat.name == "s · similarity"
    assert heat in shown and result_name("t", "similarity") in viewer.layers
    assert result_name("o", "similarity") not in viewer.layers
    r, c = np.round(heat.world_to_data(centres[7])).astype(int)
    assert heat.data[r, c] == np.nanmax(heat.data)

    # k-means (the dock's job) -> table, Labels layer
    gen = cluster_job(s.features, 4)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            clusters = stop.value
            break
    session.set_clusters("s", clusters)
    rows = s.cluster_rows()
    assert sum(r["count"] for r in rows) == s.n
    # stride == patch size: patches do not overlap, each covers (64 px × MPP)²
    assert sum(r["area_um2"] for r in rows) == pytest.approx(s.n * (64 * MPP) ** 2)
    lay = session.show_clusters("s")
    assert lay.name == result_name("s", "clusters") and lay.data.max() == 4

    session.select("s", [1, 2, 3])
    sel = session.show_selection("s")
    assert sel.name == result_name("s", "selection")
    assert sel.metadata["napari_gpfm"]["n_selected"] == 3 and (sel.data > 0).sum() == 3

    files = s.export(tmp_path / "exports")
    out = tmp_path / "exports"
    names = {p.name for p in files}
    want = {"s_clusters.png", "s_similarity.png", "s_patches.geojson", "s_clusters.geojson"}
    assert want <= names
    table = next(p for p in files if "_patches." in p.name and p.suffix in (".csv", ".parquet"))
    if table.suffix == ".csv":
        with open(table) as fh:
            rows_csv = list(csv.DictReader(fh))
    else:
        import pyarrow.parquet as pq

        rows_csv = pq.read_table(table).to_pylist()
    assert len(rows_csv) == s.n
    assert int(rows_csv[5]["cluster"]) == s.clusters.labels[5]
    from PIL import Image

    from napari_gpfm.annotations.geojson import read_geojson

    png = np.asarray(Image.open(out / "s_clusters.png"))
    g = s.grid
    assert png.shape[:2] == g.shape and png.shape[2] == 4
    side = json.loads((out / "s_clusters.png.json").read_text())
    # the overlay's first cell is centred on the top-left patch's centre (pixel-centre rule)
    P = 64
    np.testing.assert_allclose(side["translate_yx"], ((coords[:, 1].min() + P / 2 - 0.5) * MPP,
                                                      (coords[:, 0].min() + P / 2 - 0.5) * MPP))
    pal = (convert.CLUSTER_COLOURS * 255).round()
    np.testing.assert_allclose(png[g.rows[0], g.cols[0], :3], pal[s.clusters.labels[0]],
                               atol=1)  # fmt: skip
    assert len(read_geojson(out / "s_patches.geojson")) == s.n
    merged = read_geojson(out / "s_clusters.geojson")
    assert sum(a.properties["measurements"]["patches"] for a in merged) == s.n
    assert sum(a.area for a in merged) == pytest.approx(s.n * 64**2)


def test_patch_grid_preview_layer_checkerboard():
    coords = _grid_coords()
    g = patch_grid(coords, 64, MPP)
    data, kwargs, _ = convert.patch_grid_layer_data(g, "p")
    assert set(np.unique(data)) == {0, 1, 2}
    assert (data > 0).sum() == len(coords)
