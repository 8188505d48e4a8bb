"""Issue 16 (9, and the GeoJSON part of 2): malformed QuPath GeoJSON is refused with the file
and the feature named, what takes no part in labels is reported (not dropped silently), and no
NaN is ever written into a GeoJSON file. After each failure a good file still reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_gpfm.annotations.geojson import (
    Annotation,
    GeoJSONError,
    GeoJSONWarning,
    patch_features,
    read_geojson,
    write_geojson,
)
from napari_gpfm.errors import NapariGpfmError

SQUARE = [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]


def feature(geometry=None, classification=None, **props) -> dict:
    if classification is not None:
        props["classification"] = classification
    return {"type": "Feature", "geometry": geometry or {"type": "Polygon", "coordinates": SQUARE},
            "properties": props}  # fmt: skip


def collection(*features) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


GOOD = collection(feature(classification={"name": "Tumor", "color": [200, 0, 0]}),
                  feature(classification={"name": "Stroma", "color": [0, 150, 0]}))  # fmt: skip


def write(tmp_path, obj, name="annotations.geojson") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")
    return str(path)


def still_reads(tmp_path) -> None:
    anns = read_geojson(write(tmp_path, GOOD, "good.geojson"))
    assert [a.class_name for a in anns] == ["Tumor", "Stroma"]


def refused(path, match: str) -> GeoJSONError:
    with pytest.raises(GeoJSONError, match=match) as info:
        read_geojson(path)
    assert isinstance(info.value, NapariGpfmError)  # the CLI's one "error:" line
    return info.value


# ------------------------------------------------------------------ refused, named
def test_collection_without_features(tmp_path):
    """Gave "attempt to get argmax of an empty sequence" further on."""
    path = write(tmp_path, {"type": "FeatureCollection"}, "nofeatures.geojson")
    refused(path, r"nofeatures\.geojson: the FeatureCollection has no 'features' member")
    still_reads(tmp_path)


@pytest.mark.parametrize(
    "classification, what",
    [({"name": 5, "color": [1, 2, 3]}, r"the class name is 5 \(a number\)"),
     ({"name": ["Tumor"]}, r"the class name is \['Tumor'\] \(a list\)"),
     (["Tumor"], r"'classification' is \['Tumor'\] \(a list\)"),
     (7, r"'classification' is 7 \(a number\)"),
     ({"names": ["A", 3]}, r"the class 'names' are"),
     ({"name": "T", "color": "red"}, r"the class colour is 'red' \(text\)"),
     ({"name": "T", "color": [300, -5, 1e9]}, r"the class colour is \[300, -5, 1000000000\.0\]"),
     ({"name": "T", "color": [1, 2]}, r"the class colour is \[1, 2\]"),
     ({"name": "T", "colorRGB": "abc"}, r"the class colour 'colorRGB' is 'abc' \(text\)")],
)  # fmt: skip
def test_bad_classes_and_colours_name_the_file_and_feature(tmp_path, classification, what):
    """A numeric or list class name gave an AttributeError traceback; colours like "red",
    [300, -5, 1e9] or a packed "abc" gave messages without the file name."""
    obj = collection(feature(classification={"name": "Tumor"}),
                     feature(classification=classification))  # fmt: skip
    path = write(tmp_path, obj, "classes.geojson")
    refused(path, rf"classes\.geojson, feature 1: {what}")
    still_reads(tmp_path)


def test_latin1_file(tmp_path):
    path = tmp_path / "latin1.geojson"
    text = json.dumps(collection(feature(classification={"name": "Tumeur bénigne"})),
                      ensure_ascii=False)  # fmt: skip
    path.write_bytes(text.encode("latin-1"))
    refused(str(path), r"latin1\.geojson: not UTF-8 text \(byte 0xe9 at offset \d+")
    still_reads(tmp_path)


def test_utf8_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "bom.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    assert len(read_geojson(path)) == 2


def test_deep_nesting(tmp_path):
    path = write(tmp_path, "[" * 100_000 + "]" * 100_000, "deep.geojson")
    refused(path, r"deep\.geojson: nested too deeply")
    nested = feature(geometry={"type": "Polygon", "coordinates": [[[[[[0, 0]]]]] * 3]})
    path = write(tmp_path, collection(feature(), nested), "deepcoords.geojson")
    refused(path, r"deepcoords\.geojson, feature 1: (malformed Polygon|a polygon ring)")
    still_reads(tmp_path)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_coordinates(tmp_path, bad):
    """NaN/inf positions were dropped silently."""
    text = json.dumps(collection(feature(), feature())).replace("[100, 100]", f"[100, {bad}]", 2)
    path = write(tmp_path, text, "nan.geojson")
    err = refused(path, r"nan\.geojson, feature 0: position 2 of a polygon ring is")
    assert "not a finite" in str(err)
    still_reads(tmp_path)


def test_other_malformed_shapes_name_the_feature(tmp_path):
    for i, geometry in enumerate([
        {"type": "Polygon", "coordinates": []},
        {"type": "Polygon", "coordinates": 5},
        {"type": "MultiPolygon", "coordinates": [[[["a", "b"], [1, 1], [2, 2]]]]},
        {"type": "Polygon"},
        {"coordinates": SQUARE},
    ]):  # fmt: skip
        path = write(tmp_path, collection(feature(), feature(geometry=geometry)), f"shape{i}.json")
        refused(path, rf"shape{i}\.json, feature 1: ")
    still_reads(tmp_path)


# ------------------------------------------------------------------ reported, not dropped
def test_shapes_that_are_not_areas_are_reported_once_with_their_count(tmp_path):
    """LineString/Point/GeometryCollection shapes were dropped silently."""
    obj = collection(
        feature(classification="Tumor"),
        feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "Tumor"),
        feature({"type": "Point", "coordinates": [3, 4]}, "Tumor"),
        feature({"type": "LineString", "coordinates": [[1, 0], [5, 9]]}, "Stroma"),
        feature({"type": "GeometryCollection", "geometries": []}, "Stroma"),
    )
    path = write(tmp_path, obj, "mixed.geojson")
    with pytest.warns(GeoJSONWarning) as caught:
        anns = read_geojson(path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert messages[0].startswith(f"{path}: 4 features are not an area (2 LineString, 1 Point, "
                                  "1 GeometryCollection; features 1, 2, 3, 4)")  # fmt: skip
    assert anns.notes == messages
    assert len(anns) == 5 and anns[1].raw_geometry["type"] == "LineString"  # kept


def test_coordinates_outside_the_slide_are_reported(tmp_path):
    """Far-outside coordinates were dropped silently; with the slide size they are named."""
    far = [[[5e9, 5e9], [5e9 + 10, 5e9], [5e9, 5e9 + 10], [5e9, 5e9]]]
    edge = [[[900, 900], [1200, 900], [1200, 1200], [900, 900]]]
    obj = collection(
        feature(classification="Tumor"),
        feature({"type": "Polygon", "coordinates": far}, "Tumor"),
        feature({"type": "Polygon", "coordinates": edge}, "Stroma"),
    )
    path = write(tmp_path, obj, "outside.geojson")
    inside = r"outside\.geojson: 1 feature lies entirely outside the slide \(1,000 × 1,000 px\)"
    with pytest.warns(GeoJSONWarning, match=inside + r" \(feature 1\)"):
        anns = read_geojson(path, slide_size=(1000, 1000))
    assert any("1 feature reaches outside the slide (1,000 × 1,000 px) (feature 2)" in n
               for n in anns.notes)  # fmt: skip
    anywhere = r"outside\.geojson: 1 feature lies entirely beyond ±10,000,000 px, outside any "
    with pytest.warns(GeoJSONWarning, match=anywhere + r"slide \(feature 1\)"):
        read_geojson(path)  # no slide size: only what is outside any slide


def test_no_classes_is_a_note_and_an_empty_file_a_warning(tmp_path):
    """No classifications (gave the argmax error when training): a note the caller shows."""
    anns = read_geojson(write(tmp_path, collection(feature(), feature()), "plain.geojson"))
    assert anns.notes == [f"{tmp_path / 'plain.geojson'}: none of the 2 features has a class "
                          "(properties.classification): they can be shown, not used to train "
                          "a classifier"]  # fmt: skip
    with pytest.warns(GeoJSONWarning, match=r"empty\.geojson: the file holds no features"):
        assert len(read_geojson(write(tmp_path, collection(), "empty.geojson"))) == 0


# ------------------------------------------------------------------ 2. never NaN in JSON
def _strict_load(path) -> object:
    def refuse(token):
        raise AssertionError(f"{path} holds {token}: not JSON")

    with open(path, encoding="utf-8") as fh:
        return json.load(fh, parse_constant=refuse)


def test_nan_measurements_are_written_as_null_and_said(tmp_path):
    """NaN features gave NaN probabilities and a GeoJSON with a bare NaN (invalid JSON)."""
    coords = np.array([[0, 0], [224, 0], [448, 0]])
    feats = patch_features(coords, 224, {"p_tumor": np.array([0.2, np.nan, np.inf])},
                           labels=np.array([0, 1, -1]),
                           class_names=["Tumor", "Stroma"])  # fmt: skip
    out = tmp_path / "patches.geojson"
    with pytest.warns(GeoJSONWarning) as caught:
        write_geojson(out, feats)
    message = str(caught[0].message)
    assert str(out) in message and "2 NaN or infinite values written as null" in message
    assert "feature 1 properties.measurements.p_tumor" in message
    assert "feature 2 properties.measurements.p_tumor" in message
    data = _strict_load(out)
    values = [f["properties"]["measurements"]["p_tumor"] for f in data["features"]]
    assert values == [0.2, None, None]
    again = read_geojson(out)  # and it reads back
    assert math.isclose(again[0].properties["measurements"]["p_tumor"], 0.2)


def test_a_nan_shape_is_refused_and_the_previous_file_kept(tmp_path):
    out = tmp_path / "shapes.geojson"
    write_geojson(out, read_geojson(write(tmp_path, GOOD, "good.geojson")))
    before = out.read_bytes()
    ring = np.array([[0, 0], [10, 0], [10, np.nan], [0, 0]], dtype=np.float64)
    bad = [Annotation([[np.array(SQUARE[0], dtype=np.float64)]], "Polygon", "Tumor"),
           Annotation([[ring]], "Polygon", "Stroma")]  # fmt: skip
    with pytest.raises(GeoJSONError, match=r"shapes\.geojson: not written: feature 1 geometry"
                                           r"\.coordinates\[0\]\[2\]\[1\] is nan"):  # fmt: skip
        write_geojson(out, bad)
    assert out.read_bytes() == before  # untouched
    assert not (tmp_path / "shapes.geojson.part").exists()
    still_reads(tmp_path)
