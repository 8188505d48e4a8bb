"""Real QuPath exports round-trip key for key; every member QuPath uses survives.

The QuPath 0.2 exports are read from ``../shared/data/third-party/annotations/`` (beside the
repository; see its SOURCES.md: not copied into the repository, their licence differs).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from napari_gpfm.annotations.geojson import (
    AnnotationList,
    annotations_from_geojson,
    annotations_to_geojson,
    read_geojson,
    write_geojson,
)
from napari_gpfm.annotations.shapes import LayerFrame, annotations_to_shapes, shapes_to_annotations

THIRD_PARTY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "third-party"
QUPATH_02 = THIRD_PARTY / "annotations" / "qupath-0.2-wsidicom"
EXPORTS = sorted(QUPATH_02.glob("*.json")) if QUPATH_02.is_dir() else []
needs_exports = pytest.mark.skipif(
    not EXPORTS, reason=f"third-party QuPath exports not found in {QUPATH_02} (see SOURCES.md)"
)

# The documented normalisations (napari_gpfm.annotations.geojson module docstring), and the only
# differences compare() accepts: whitespace and key order are not compared (parsed JSON), and
#  - "number": a polygon coordinate may come back as an int when its value is integral
#    (26388.0 -> 26388), same value;
#  - "closed ring": an unclosed polygon ring comes back closed (one position appended);
#  - "2-D": a third (z) coordinate of a polygon position is dropped.
NORMALISATIONS = ("number", "closed ring", "2-D")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare(a, b, where: str = "$", in_polygon: bool = False) -> list[str]:
    """Differences between two parsed JSON values, key by key, except NORMALISATIONS."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: key {k!r} {'lost' if k in a else 'added'}"
               for k in sorted(set(a) ^ set(b))]
        poly = a.get("type") in ("Polygon", "MultiPolygon")
        for k in a.keys() & b.keys():
            out += compare(a[k], b[k], f"{where}.{k}", in_polygon or (poly and k == "coordinates"))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if in_polygon and a and all(isinstance(p, list) and p and _is_number(p[0]) for p in a):
            ring = [p[:2] for p in a]  # "2-D"
            if ring[0] != ring[-1]:
                ring = ring + [ring[0]]  # "closed ring"
            a = ring
        if len(a) != len(b):
            return [f"{where}: {len(a)} items became {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in compare(x, y, f"{where}[{i}]", in_polygon)]
    if in_polygon and _is_number(a) and _is_number(b):
        return [] if a == b else [f"{where}: {a!r} became {b!r}"]  # "number"
    if type(a) is not type(b) or a != b:
        return [f"{where}: {a!r} became {b!r}"]
    return []


def test_compare_reports_what_differs():
    a = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1.0, 0],
                                                                              [1, 1]]]},
         "properties": {"isLocked": False, "n": 1}}
    b = copy.deepcopy(a)
    b["geometry"]["coordinates"][0] = [[0, 0], [1, 0], [1, 1], [0, 0]]  # normalisations only
    assert compare(a, b) == []
    b["properties"]["isLocked"] = 0
    b["properties"].pop("n")
    b["geometry"]["isEllipse"] = True
    assert sorted(compare(a, b)) == ["$.geometry: key 'isEllipse' added",
                                     "$.properties.isLocked: False became 0",
                                     "$.properties: key 'n' lost"]


@needs_exports
@pytest.mark.parametrize("path", EXPORTS, ids=[p.name for p in EXPORTS])
def test_qupath_02_exports_round_trip_key_for_key(path, tmp_path):
    original = json.loads(path.read_text(encoding="utf-8"))
    out = write_geojson(tmp_path / path.name, read_geojson(path))
    written = json.loads(Path(out).read_text(encoding="utf-8"))
    assert compare(original, written) == []
    assert type(written) is type(original)  # a bare Feature / list stays one


@needs_exports
def test_qupath_02_exports_read_as_qupath_shows_them():
    by_name = {p.stem: read_geojson(p) for p in EXPORTS}
    (ellipse,) = by_name["qupath-ellipse"]
    assert by_name["qupath-ellipse"].container == "Feature"
    assert ellipse.object_type == "annotation" and ellipse.geometry_type == "Polygon"
    assert ellipse.class_name is None and ellipse.properties["name"] == "ellipse"
    assert ellipse.area > 0 and "objectType" not in ellipse.properties
    (point,) = by_name["qupath-point"]
    assert point.raw_geometry["type"] == "Point" and not point.polygons
    cells = by_name["qupath-polygon-cell-classified"]
    assert cells.container == "features" and len(cells) == 4
    assert [a.class_name for a in cells] == ["Cell", "Cell", "Nucleus", "Nucleus"]
    assert cells[0].color == (127, 220, 58) and cells[2].color == (184, 115, 67)  # colorRGB
    assert cells[0].properties["color"] == [127, 220, 58]  # the object's own colour, verbatim


def qupath_06_collection() -> dict:
    """What QuPath 0.4-0.6 write, with every member our model does not use."""
    ring = [[0, 0], [100, 0], [100, 60], [0, 60], [0, 0]]
    return {
        "type": "FeatureCollection",
        "bbox": [0, 0, 500, 500],
        "name": "export from QuPath",
        "features": [
            {"type": "Feature", "id": "0b5e8a4c-0000-4000-8000-000000000001",
             "geometry": {"type": "Polygon", "coordinates": [ring], "isEllipse": True,
                          "plane": {"c": -1, "z": 3, "t": 1}},
             "properties": {"objectType": "annotation", "name": "an ellipse",
                            "classification": {"names": ["Tumor", "Positive"],
                                               "color": [200, 50, 50]},
                            "isLocked": True, "metadata": {"k": "v"}}},
            {"type": "Feature", "id": "0b5e8a4c-0000-4000-8000-000000000002",
             "geometry": {"type": "MultiPolygon", "coordinates": [[ring]]},
             "properties": {"objectType": "annotation", "classification": None}},
            {"type": "Feature", "id": "0b5e8a4c-0000-4000-8000-000000000003",
             "geometry": {"type": "Polygon", "coordinates": [ring]},
             "nucleusGeometry": {"type": "Polygon", "coordinates": [ring]},
             "properties": {"objectType": "cell",
                            "classification": {"name": "Stroma", "color": [150, 200, 150, 128]},
                            "measurements": {"Nucleus: Area": 12.5}}},
            {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]],
                                             "plane": {"c": -1, "z": 0, "t": 0}},
             "properties": {"objectType": "annotation", "classification": "Other"}},
        ],
    }


def test_every_qupath_member_survives_a_round_trip(tmp_path):
    src = qupath_06_collection()
    anns = annotations_from_geojson(copy.deepcopy(src))
    derived, unclassified, cell, line = anns
    assert derived.class_name == "Tumor: Positive" and derived.color == (200, 50, 50)
    assert derived.geometry_extra == {"isEllipse": True, "plane": {"c": -1, "z": 3, "t": 1}}
    assert unclassified.class_name is None and unclassified.color is None
    assert cell.color == (150, 200, 150) and cell.alpha == 128 and cell.object_type == "cell"
    assert line.class_name == "Other"
    assert anns.extra == {"bbox": [0, 0, 500, 500], "name": "export from QuPath"}
    assert compare(src, annotations_to_geojson(anns)) == []
    out = json.loads(Path(write_geojson(tmp_path / "x.geojson", anns)).read_text())
    assert out == src  # not even a normalisation here


def test_changed_classes_are_written_in_qupath_form():
    anns = annotations_from_geojson(qupath_06_collection())
    derived, unclassified, cell, line = anns
    derived.class_name = "Stroma"
    unclassified.class_name, unclassified.color = "Tumor: Negative", (112, 112, 225)
    cell.alpha = None
    line.class_name = None  # unclassified now: QuPath's null
    feats = annotations_to_geojson(anns)["features"]
    assert feats[0]["properties"]["classification"] == {"name": "Stroma", "color": [200, 50, 50]}
    assert feats[1]["properties"]["classification"] == {"names": ["Tumor", "Negative"],
                                                        "color": [112, 112, 225]}
    assert feats[2]["properties"]["classification"] == {"name": "Stroma",
                                                        "color": [150, 200, 150]}
    assert feats[3]["properties"]["classification"] is None
    assert feats[0]["geometry"]["isEllipse"] is True  # geometry untouched: members stay


def test_legacy_objects_keep_their_form_until_changed():
    legacy = {"type": "Feature", "id": "PathDetectionObject",
              "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
              "properties": {"classification": {"name": "Cell", "colorRGB": -8397766}}}
    anns = annotations_from_geojson(copy.deepcopy(legacy))
    assert anns[0].object_type == "detection" and anns[0].color == (127, 220, 58)
    assert annotations_to_geojson(anns) == legacy  # packed colour, no objectType added
    anns[0].object_type, anns[0].color = "annotation", (1, 2, 3)
    props = annotations_to_geojson(anns)["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "Cell", "color": [1, 2, 3]}


@pytest.mark.parametrize("geometry", [
    {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
    {"type": "Point", "coordinates": [3.5, 4.25]},
    {"type": "MultiPolygon", "coordinates": [[[[0, 0], [10, 0], [10, 10], [0, 0]]]],
     "plane": {"c": -1, "z": 2, "t": 0}},
])
def test_bare_geometry_and_bare_feature_are_read_and_written_back(tmp_path, geometry):
    path = tmp_path / "bare.geojson"
    path.write_text(json.dumps(geometry))
    anns = read_geojson(path)
    assert anns.container == "geometry" and len(anns) == 1 and anns[0].class_name is None
    assert json.loads(Path(write_geojson(tmp_path / "out.geojson", anns)).read_text()) == geometry
    # with a second object it becomes a FeatureCollection; the geometry gets a bare feature
    two = AnnotationList([anns[0], anns[0]], anns.container)
    coll = annotations_to_geojson(two)
    assert coll["type"] == "FeatureCollection"
    assert coll["features"][0] == {"type": "Feature", "geometry": geometry, "properties": {}}
    feature = {"type": "Feature", "geometry": geometry, "properties": {"name": "x"}}
    path.write_text(json.dumps(feature))
    again = read_geojson(path)
    assert again.container == "Feature" and again[0].properties == {"name": "x"}
    assert json.loads(Path(write_geojson(tmp_path / "f.geojson", again)).read_text()) == feature


def test_edited_ellipse_loses_is_ellipse_but_keeps_its_plane():
    anns = annotations_from_geojson(qupath_06_collection())
    frame = LayerFrame.for_slide(0.5)
    sd = annotations_to_shapes(anns, frame)
    kept = shapes_to_annotations(sd.data, sd.shape_type, sd.classes, frame, sd.annotation,
                                 sd.templates)
    assert kept[0].geometry_extra == {"isEllipse": True, "plane": {"c": -1, "z": 3, "t": 1}}
    moved = [d + 7.0 if i == 0 else d for i, d in enumerate(sd.data)]
    edited = shapes_to_annotations(moved, sd.shape_type, sd.classes, frame, sd.annotation,
                                   sd.templates)
    assert edited[0].geometry_extra == {"plane": {"c": -1, "z": 3, "t": 1}}
    assert np.allclose(edited[0].polygons[0][0][0], [7, 7])  # data are level-0 px here
