"""QuPath GeoJSON: read what QuPath writes, write it back without losing anything."""

import json

import numpy as np
import pytest
from skimage.draw import polygon2mask

from napari_gpfm.annotations.geojson import (
    GeoJSONError,
    class_polygons,
    patch_features,
    polygon_area,
    read_geojson,
    trace_mask,
    write_geojson,
)

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
HOLE = [[25, 25], [25, 75], [75, 75], [75, 25], [25, 25]]


def qupath_features():
    """Features as QuPath 0.2-0.5 export them (both colour styles, holes, multipolygons)."""
    return [
        {
            "type": "Feature",
            "id": "6b1c3a52-1f0e-4c1a-9a43-0a3a0b8c2b11",
            "geometry": {"type": "Polygon", "coordinates": [SQUARE, HOLE]},
            "properties": {
                "objectType": "annotation",
                "name": "ring of tumour",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "isLocked": False,
                "measurements": {"Area µm^2": 1875.0},
            },
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[200, 0], [300, 0], [300, 50], [200, 50], [200, 0]]],
                    [[[400.5, 10.25], [450, 10.25], [450, 60], [400.5, 10.25]]],
                ],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Stroma", "color": [150, 200, 150]},
            },
        },
        {  # QuPath 0.2: legacy id, packed colour, no objectType
            "type": "Feature",
            "id": "PathAnnotationObject",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[0, 200], [50, 200], [50, 250], [0, 200]]],
            },
            "properties": {
                "classification": {"name": "Ignore*", "colorRGB": -5592406},
                "isLocked": True,
            },
        },
        {
            "type": "Feature",
            "id": "PathDetectionObject",
            "geometry": {"type": "Point", "coordinates": [10, 20]},
            "properties": {"classification": {"name": "Lymphocyte", "colorRGB": -16776961}},
            "nucleusGeometry": {"type": "Point", "coordinates": [10, 20]},
        },
    ]


def _snapshot(anns):
    return [
        (
            a.geometry_type,
            [[r.tolist() for r in p] for p in a.polygons],
            a.raw_geometry,
            a.class_name,
            a.color,
            a.object_type,
            a.id,
            a.properties,
            a.classification_extra,
            a.extra,
            a.excluded,
        )
        for a in anns
    ]


@pytest.mark.parametrize("collection", [True, False])
def test_qupath_file_round_trips_losslessly(tmp_path, collection):
    feats = qupath_features()
    src = tmp_path / "qupath.geojson"
    src.write_text(
        json.dumps({"type": "FeatureCollection", "features": feats} if collection else feats)
    )
    anns = read_geojson(src)

    tumour, stroma, ignore, cell = anns
    assert tumour.class_name == "Tumor" and tumour.color == (200, 0, 0)
    assert tumour.area == 100 * 100 - 50 * 50
    assert tumour.properties["name"] == "ring of tumour"
    assert stroma.geometry_type == "MultiPolygon" and len(stroma.polygons) == 2
    assert ignore.excluded and not tumour.excluded
    assert ignore.color == (170, 170, 170)  # -5592406 = 0xFFAAAAAA
    assert ignore.object_type == "annotation" and cell.object_type == "detection"
    assert cell.color == (0, 0, 255) and cell.raw_geometry["type"] == "Point"

    out = write_geojson(tmp_path / "out.geojson", anns, as_collection=collection)
    again = read_geojson(out)
    assert _snapshot(again) == _snapshot(anns)


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "broken.geojson"
    bad.write_text("{not json")
    with pytest.raises(GeoJSONError, match="broken.geojson.*not valid JSON"):
        read_geojson(bad)
    bad.write_text(
        json.dumps(
            [
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]},
                }
            ]
        )
    )
    with pytest.raises(GeoJSONError, match="broken.geojson, feature 0.*at least 3"):
        read_geojson(bad)


def _paint(polygons, shape):
    """Rasterise traced polygons back (even-odd over all rings) at cell centres."""
    out = np.zeros(shape, dtype=bool)
    for poly in polygons:
        for ring in poly:
            out ^= polygon2mask(shape, ring[:, ::-1])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_traced_polygons_reproduce_the_mask_exactly(seed):
    mask = np.random.default_rng(seed).random((30, 40)) > 0.5
    mask[10:20, 10:20] = True
    mask[14:16, 14:16] = False  # a hole
    polys = trace_mask(mask, origin=(-0.5, -0.5))  # cell centres on integer positions
    assert sum(polygon_area(p) for p in polys) == mask.sum()
    np.testing.assert_array_equal(_paint(polys, mask.shape), mask)
    for poly in polys:
        assert poly[0][0].tolist() == poly[0][-1].tolist()


def test_corner_touching_cells_are_separate_polygons_and_notches_are_holes():
    assert len(trace_mask(np.array([[1, 0], [0, 1]]))) == 2
    (poly,) = trace_mask(np.array([[0, 1, 1], [1, 0, 1], [1, 1, 1]]))
    assert len(poly) == 2 and polygon_area(poly) == 7


class _Grid:  # the attributes class_polygons reads from napari_gpfm.analyses.PatchGrid
    x0, y0, cell = 1000, 2000, 224


class _Raster:
    def __init__(self, data):
        self.data, self.grid = np.asarray(data), _Grid()


def test_merged_class_polygons_have_the_area_of_their_patches(tmp_path):
    raster = _Raster([[1, 1, 2], [1, 0, 2], [1, 1, 2]])  # class 0: a C of 5 patches
    anns = class_polygons(raster, ["tumour", "stroma"], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    tumour, stroma = anns
    assert tumour.class_name == "tumour" and tumour.color == (255, 0, 0)
    assert tumour.area == 5 * 224**2 and stroma.area == 3 * 224**2
    assert stroma.color == (0, 0, 255)
    assert tumour.polygons[0][0][:, 0].min() == 1000 and tumour.polygons[0][0][:, 1].min() == 2000
    read_back = read_geojson(write_geojson(tmp_path / "c.geojson", anns))
    assert [a.area for a in read_back] == [a.area for a in anns]


def test_patch_features_are_squares_with_measurements():
    coords = np.array([[0, 0], [224, 0]])
    anns = patch_features(
        coords,
        224,
        {"tumour_p": np.array([0.9, 0.1])},
        labels=np.array([0, -1]),
        class_names=["tumour"],
    )
    assert [a.area for a in anns] == [224**2, 224**2]
    assert anns[0].class_name == "tumour" and anns[1].class_name is None
    assert anns[0].properties["measurements"] == {"tumour_p": pytest.approx(0.9)}
    assert anns[0].object_type == "detection"
