"""Class palette, and Shapes/Labels layer data ⇄ annotations (µm scale, QuPath round trip)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from napari.layers import Labels, Shapes

from napari_gpfm.annotations import labels_from_annotations, read_geojson
from napari_gpfm.annotations.classes import (
    ClassPalette,
    packed_rgb,
    palette_path,
    parse_colour,
    unpack_rgb,
)
from napari_gpfm.annotations.geojson import annotations_to_geojson
from napari_gpfm.annotations.shapes import LayerFrame, pack_rings, split_rings
from napari_gpfm.layers.annotation_layers import (
    annotation_layer_data,
    annotations_from_layer,
    apply_class_colours,
    labels_from_paint_layer,
    paint_layer_data,
    set_class_of,
)

MPP = 0.5


# --- palette -----------------------------------------------------------------------------------


def test_palette_add_rename_recolour_active_and_persist(tmp_path):
    seen = []
    pal = ClassPalette()
    pal.connect(lambda p: seen.append(p.names))
    assert pal.add("Tumor").colour == (200, 0, 0)  # QuPath's default colour for Tumor
    assert pal.add("Ignore*").colour == (180, 180, 180)
    a = pal.add("gland")
    b = pal.add("fat", "#ff8000")
    assert a.colour not in {(200, 0, 0), (180, 180, 180)} and b.colour == (255, 128, 0)
    assert pal.active == "Tumor" and pal.training_names == ["Tumor", "gland", "fat"]
    pal.set_active("gland")
    pal.rename("gland", "Gland")
    assert pal.active == "Gland" and pal.names == ["Tumor", "Ignore*", "Gland", "fat"]
    pal.recolour("fat", [0.0, 1.0, 0.5])
    assert pal.colour("fat") == (0, 255, 128)
    with pytest.raises(ValueError, match="already exists"):
        pal.add("Tumor")
    with pytest.raises(KeyError):
        pal.set_active("nope")
    assert len(seen) == 7

    path = pal.save(palette_path(tmp_path))
    assert path == tmp_path / "classes.json"
    back = ClassPalette.load(tmp_path)
    assert back.names == pal.names and back.active == "Gland"
    assert back.colours().tolist() == pal.colours().tolist()
    pal.remove("Gland")
    assert pal.active == "Tumor"


def test_palette_reads_qupath_class_list_and_packed_colours(tmp_path):
    assert unpack_rgb(packed_rgb((12, 34, 56))) == (12, 34, 56)
    assert packed_rgb((255, 0, 0)) == -65536  # QuPath writes signed ARGB ints
    assert parse_colour(-65536) == (255, 0, 0)
    qp = {"pathClasses": [{"name": "Tumor", "color": -3670016},
                          {"name": "Stroma", "color": packed_rgb((150, 200, 150))}]}
    (tmp_path / "classes.json").write_text(json.dumps(qp))
    pal = ClassPalette.load(tmp_path / "classes.json")
    assert pal.names == ["Tumor", "Stroma"] and pal.colour("Tumor") == (200, 0, 0)
    assert pal.to_qupath() == qp
    assert palette_path(tmp_path / "x.h5") == tmp_path / "x.classes.json"


# --- rings -----------------------------------------------------------------------------------


def test_pack_and_split_rings_keep_holes():
    ext = np.array([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], float)
    hole = np.array([[2, 2], [4, 2], [4, 4], [2, 2]], float)
    packed = pack_rings([ext, hole])
    rings = split_rings(packed)
    assert len(rings) == 2 and np.array_equal(rings[0], ext) and np.array_equal(rings[1], hole)
    assert len(pack_rings([ext])) == 4  # napari closes simple polygons itself
    assert np.array_equal(split_rings(pack_rings([ext]))[0], ext)


# --- shapes -> patch labels, exact, through layer coordinates -----------------------------------


def _patch_grid(P=100, n=10):
    yy, xx = np.mgrid[0:n, 0:n]
    return np.stack([xx.ravel(), yy.ravel()], 1).astype(np.int64) * P


def _world(v):
    """Level-0 vertex (QuPath corner convention) -> world µm: (v − 0.5)·mpp."""
    return (np.asarray(v, float) - 0.5) * MPP


@pytest.mark.parametrize("frame", ["micrometre", "slide"])
def test_shapes_to_patch_labels_exact_with_um_scale(frame):
    coords, P = _patch_grid(), 100
    # level-0 rectangle [100, 300) x [150, 250): exactly half of patches (100|200, 100|200)
    x0, x1, y0, y1 = 100, 300, 150, 250
    # covers patch (600, 600) fully and exactly half of (700, 600) and (600, 700)
    tri = np.array([[600, 600], [800, 600], [600, 800]], float)
    world_rect = np.array([[_world(y0), _world(x0)], [_world(y0), _world(x1)],
                           [_world(y1), _world(x1)], [_world(y1), _world(x0)]])
    world_tri = np.stack([_world(tri[:, 1]), _world(tri[:, 0])], 1)
    if frame == "micrometre":  # a Shapes layer whose data are µm (scale 1)
        layer = Shapes([world_rect, world_tri], shape_type=["rectangle", "polygon"],
                       features={"class": ["Tumor", "Stroma"]})
    else:  # napari's Shapes layer over a slide: scale (mpp, mpp), data = level-0 px centres
        layer = Shapes([world_rect / MPP, world_tri / MPP], shape_type=["rectangle", "polygon"],
                       features={"class": ["Tumor", "Stroma"]}, scale=(MPP, MPP))
    anns = annotations_from_layer(layer, MPP)
    assert [a.class_name for a in anns] == ["Tumor", "Stroma"]
    np.testing.assert_allclose(anns[0].polygons[0][0][:-1],
                               [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], atol=1e-9)
    pl = labels_from_annotations(anns, coords, P, ["Tumor", "Stroma"], min_fraction=0.5)
    where = {tuple(c): lab for c, lab in zip(coords.tolist(), pl.labels.tolist()) if lab >= 0}
    # each of the four half-covered patches reaches exactly 0.5: a half-pixel error would drop
    # one row to 0.495
    assert where == {(100, 100): 0, (200, 100): 0, (100, 200): 0, (200, 200): 0,
                     (600, 600): 1, (700, 600): 1, (600, 700): 1}
    i = int(np.nonzero((coords == (100, 100)).all(1))[0][0])
    assert pl.fractions[i, 0] == pytest.approx(0.5, abs=1e-9)


def test_painted_labels_to_patch_labels_by_majority():
    coords, P = _patch_grid(), 100
    pal = ClassPalette([("Tumor", None), ("Stroma", None), ("Ignore*", None)])
    data, kwargs, _ = paint_layer_data((1000, 1000), MPP, pal, cell=10)
    layer = Labels(data, **{k: v for k, v in kwargs.items() if k != "colormap"})
    layer.data[0:10, 0:6] = 1  # level-0 x [0, 60) of patch (0, 0): 60 % Tumor
    layer.data[10:20, 0:4] = 2  # patch (0, 100): 40 % Stroma, below min_fraction
    layer.data[30:40, 30:40] = 3  # patch (300, 300): Ignore*
    pl = labels_from_paint_layer(layer, MPP, coords, P, pal, pal.training_names, 0.5)
    lab = dict(zip(map(tuple, coords.tolist()), pl.labels.tolist()))
    assert lab[(0, 0)] == 0 and lab[(0, 100)] == -1 and (pl.labels >= 0).sum() == 1
    assert pl.ignored[(coords == (300, 300)).all(1)].all()
    assert pl.fractions[(coords == (0, 0)).all(1), 0] == pytest.approx(0.6)


# --- QuPath GeoJSON -> Shapes layer -> QuPath ----------------------------------------------------


QUPATH = {
    "type": "FeatureCollection",
    "features": [
        {"type": "Feature", "id": "5c3f3c2a-0001",
         "geometry": {"type": "Polygon", "coordinates": [
             [[1000, 1000], [3000, 1000], [3000, 3000], [1000, 3000], [1000, 1000]],
             [[1500, 1500], [1800.25, 1500], [1800.25, 1800.5], [1500, 1500]]]},
         "properties": {"objectType": "annotation", "name": "tumour core", "isLocked": True,
                        "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "id": "5c3f3c2a-0002",
         "geometry": {"type": "MultiPolygon", "coordinates": [
             [[[4000, 4000], [4500, 4000], [4500, 4600.123456789], [4000, 4000]]],
             [[[6000.5, 6000.5], [7000, 6000.5], [7000, 7000], [6000.5, 7000], [6000.5, 6000.5]],
              [[6200, 6200], [6300, 6200], [6300, 6300], [6200, 6200]]]]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Stroma", "color": [150, 200, 150]},
                        "measurements": {"Area µm^2": 123.5}}},
        {"type": "Feature", "id": "5c3f3c2a-0003",
         "geometry": {"type": "Polygon", "coordinates": [
             [[100, 100], [400, 100], [400, 300], [100, 100]]]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Ignore*", "color": [180, 180, 180]}}},
        {"type": "Feature", "id": "5c3f3c2a-0004",
         "geometry": {"type": "Polygon", "coordinates": [
             [[50, 50], [90, 50], [90, 90], [50, 50]]]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature", "id": "5c3f3c2a-0005",
         "geometry": {"type": "Point", "coordinates": [10.5, 20.25]},
         "properties": {"objectType": "annotation", "name": "landmark"}},
    ],
}


def test_qupath_geojson_round_trip_through_shapes_layer(tmp_path):
    src = tmp_path / "qupath.geojson"
    src.write_text(json.dumps(QUPATH))
    anns = read_geojson(src)
    pal = ClassPalette.from_annotations(anns)
    assert pal.names == ["Tumor", "Stroma", "Ignore*"]
    data, kwargs, kind = annotation_layer_data(anns, pal, 0.2527)
    layer = Shapes(data, **kwargs)
    assert kind == "shapes" and len(layer.data) == 5  # multipolygon = 2 shapes, point = none
    assert list(layer.features["class"]) == ["Tumor", "Stroma", "Stroma", "Ignore*", ""]
    assert np.allclose(layer.edge_color[0], [200 / 255, 0, 0, 1])
    back = annotations_to_geojson(annotations_from_layer(layer, 0.2527, pal))
    assert back == QUPATH  # classes, colours, holes, multipolygons, ids, properties, points

    # Ignore* survives but is never a training label
    pl = labels_from_annotations(annotations_from_layer(layer, 0.2527, pal),
                                 np.array([[300, 100], [1000, 1000]]), 100)
    assert pl.class_names == ["Tumor", "Stroma"] and pl.excluded_classes == ["Ignore*"]
    assert pl.ignored.tolist() == [True, False] and pl.labels.tolist() == [-1, 0]


def test_edited_shapes_export_new_geometry_and_class():
    anns = read_geojson_obj(QUPATH)
    pal = ClassPalette.from_annotations(anns)
    data, kwargs, _ = annotation_layer_data(anns, pal, 0.5)
    layer = Shapes(data, **kwargs)
    layer.add_rectangles(np.array([[10, 10], [10, 50], [50, 50], [50, 10]], float))
    assert layer.features["class"].iloc[-1] == "Tumor"  # the active class
    set_class_of(layer, [5], "Stroma")
    apply_class_colours(layer, pal)
    assert np.allclose(layer.edge_color[5, :3], np.array([150, 200, 150]) / 255)
    moved = layer.data[0] + 1.0
    layer.data = [moved, *layer.data[1:]]
    out = annotations_from_layer(layer, 0.5, pal)
    assert len(out) == 6 and out[-1].class_name == "Stroma" and out[-1].id is None
    np.testing.assert_allclose(out[-1].polygons[0][0][:-1],
                               [[10.5, 10.5], [50.5, 10.5], [50.5, 50.5], [10.5, 50.5]])
    np.testing.assert_allclose(out[0].polygons[0][0][0], [1001, 1001])  # moved by 1 px
    assert out[0].properties["name"] == "tumour core" and len(out[0].polygons[0]) == 2


def read_geojson_obj(obj):
    from napari_gpfm.annotations.geojson import annotations_from_geojson

    return annotations_from_geojson(obj)


def test_layer_frame_inverse():
    f = LayerFrame((0.3, 0.3), (5.0, -2.0), 0.25)
    xy = np.array([[0.0, 0.0], [123.5, 77.25]])
    np.testing.assert_allclose(f.data_to_level0(f.level0_to_data(xy)), xy, atol=1e-9)
