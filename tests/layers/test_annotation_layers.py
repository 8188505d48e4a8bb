"""Annotation Shapes layers (class features on any Shapes layer, the active class given to every
new shape) and classifier result layers (class / probability / uncertainty maps) placed over a
translated slide. No Qt: napari's ViewerModel and layer models."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from napari.components import ViewerModel
from napari.layers import Shapes

from napari_gpfm.analyses.heatmap import heatmap_raster, labels_raster
from napari_gpfm.annotations.classes import ClassPalette
from napari_gpfm.annotations.geojson import read_geojson
from napari_gpfm.layers import annotation_layers as al
from napari_gpfm.layers.annotation_layers import (
    annotation_layer_data,
    apply_class_colours,
    attach_active_class,
    ensure_class_features,
    prediction_layer_data,
    set_class_of,
)

MPP = 0.499


def _rect(y, x, h=10.0, w=10.0):
    return np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]], float)


def _palette(active="Tumor"):
    return ClassPalette([("Tumor", None), ("Stroma", None)], active=active)


def _rgb(palette, name):
    return np.array(palette.colour(name)) / 255.0


# --- 1. class features on any Shapes layer ------------------------------------------------------

GEOJSON = {
    "type": "FeatureCollection",
    "features": [
        {"type": "Feature", "id": "a",
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [40, 0], [40, 30], [0, 30],
                                                         [0, 0]]]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Stroma", "color": [150, 200, 150]}}},
        {"type": "Feature", "id": "b",
         "geometry": {"type": "Polygon", "coordinates": [[[50, 50], [90, 50], [90, 80],
                                                         [50, 80], [50, 50]]]},
         "properties": {"objectType": "annotation"}},
    ],
}  # fmt: skip


def _napari_button_layer(selected_slide: bool):
    """The layer napari's own "new shapes layer" button makes (with / without a slide selected)."""
    from napari._app_model.actions._file import new_shapes

    vm = ViewerModel()
    if selected_slide:
        vm.add_image(np.zeros((64, 96), np.uint8), scale=(MPP, MPP), name="slide")
    else:
        vm.layers.selection.clear()
    new_shapes(vm)
    return vm.layers[-1]


def _geojson_layer(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(GEOJSON))
    anns = read_geojson(path)
    data, kwargs, _ = annotation_layer_data(anns, _palette(), MPP)
    return Shapes(data, **kwargs)


LAYERS = {
    "napari-button-over-slide": lambda tmp: _napari_button_layer(True),
    "napari-button-empty-viewer": lambda tmp: _napari_button_layer(False),
    "plain-empty": lambda tmp: Shapes(ndim=2),
    "ours-empty": lambda tmp: Shapes([], **annotation_layer_data([], _palette(), MPP)[1]),
    "from-geojson": _geojson_layer,
    "unrelated-features": lambda tmp: Shapes(
        [_rect(0, 0), _rect(20, 20)],
        features={"score": [0.5, 0.7], "name": ["a", "b"]}),
    "odd-dtypes": lambda tmp: Shapes(
        [_rect(0, 0), _rect(20, 20), _rect(40, 40)],
        features={"class": pd.Categorical(["Tumor", None, "Stroma"]),
                  "annotation": [1.0, np.nan, 2.0], "part": ["0", "1", None]}),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(LAYERS))
def test_apply_class_colours_works_on_any_shapes_layer(kind, tmp_path):
    layer = LAYERS[kind](tmp_path)
    before = layer.features.copy()
    n = len(layer.data)
    pal = _palette("Stroma")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "property used for color dropped"
        apply_class_colours(layer, pal)
    feats = layer.features
    assert {"class", "annotation", "part"} <= set(feats.columns) and len(feats) == n
    for col in before.columns:  # other columns kept as they were
        if col not in ("class", "annotation", "part"):
            assert feats[col].tolist() == before[col].tolist()
    assert pd.api.types.is_integer_dtype(feats["annotation"].dtype)
    assert pd.api.types.is_integer_dtype(feats["part"].dtype)
    assert not isinstance(feats["class"].dtype, pd.CategoricalDtype)
    d = layer.feature_defaults
    assert (d["class"].iloc[0], d["annotation"].iloc[0], d["part"].iloc[0]) == ("Stroma", -1, 0)
    # the next shape gets the active class and the class colour, the others theirs
    classes = feats["class"].tolist()
    layer.add_rectangles(_rect(100, 100))
    assert layer.features["class"].tolist() == [*classes, "Stroma"]
    assert int(layer.features["annotation"].iloc[-1]) == -1
    apply_class_colours(layer, pal)
    np.testing.assert_allclose(layer.edge_color[-1, :3], _rgb(pal, "Stroma"))
    np.testing.assert_allclose(layer.face_color[-1, 3], al.FACE_ALPHA)
    # idempotent: a second call changes nothing (no features event, so no retrain loop)
    seen = []
    layer.events.features.connect(lambda e: seen.append(e))
    apply_class_colours(layer, pal)
    assert not seen and ensure_class_features(layer) is False


def test_ensure_class_features_fills_missing_columns(tmp_path):
    layer = LAYERS["unrelated-features"](tmp_path)
    assert ensure_class_features(layer) is True
    assert layer.features["class"].tolist() == ["", ""]
    assert layer.features["annotation"].tolist() == [-1, -1]
    assert layer.features["part"].tolist() == [0, 0]
    odd = LAYERS["odd-dtypes"](tmp_path)
    ensure_class_features(odd)
    assert odd.features["class"].tolist() == ["Tumor", "", "Stroma"]
    assert odd.features["annotation"].tolist() == [1, -1, 2]
    assert odd.features["part"].tolist() == [0, 1, 0]
    geo = _geojson_layer(tmp_path)
    assert ensure_class_features(geo) is False
    assert geo.features["class"].tolist() == ["Stroma", ""]


# --- 2. the active class at the moment a shape is added ----------------------------------------


def _attached(layer=None, active="Tumor"):
    pal = _palette(active)
    layer = Shapes(ndim=2) if layer is None else layer
    apply_class_colours(layer, pal)
    return layer, pal, attach_active_class(layer, lambda: pal.active, pal)


def test_every_added_shape_gets_the_class_active_then():
    layer, pal, detach = _attached()
    layer.add_rectangles(_rect(0, 0))
    # the user picks another class; nothing refreshes the defaults (no debounce ran) and a
    # features update reset napari's defaults to the last row's values (Tumor)
    pal.set_active("Stroma")
    set_class_of(layer, [0], "Tumor")
    assert layer.feature_defaults["class"].iloc[0] == "Tumor"
    layer.add_rectangles([_rect(20, 0), _rect(40, 0)])  # two at once
    layer.add_ellipses(_rect(60, 0), edge_color="yellow", face_color="blue")  # class colours win
    assert layer.features["class"].tolist() == ["Tumor", "Stroma", "Stroma", "Stroma"]
    for i, name in enumerate(["Tumor", "Stroma", "Stroma", "Stroma"]):
        np.testing.assert_allclose(layer.edge_color[i, :3], _rgb(pal, name))
        np.testing.assert_allclose(layer.face_color[i], [*_rgb(pal, name), al.FACE_ALPHA])
    # no active class: unclassified, grey
    pal.set_active(None)
    layer.add_polygons(_rect(80, 0))
    assert layer.features["class"].iloc[-1] == ""
    np.testing.assert_allclose(layer.edge_color[-1, :3], [128 / 255] * 3)
    detach()
    pal.set_active("Stroma")
    layer.feature_defaults = {"class": "Tumor", "annotation": -1, "part": 0}
    layer.add_rectangles(_rect(100, 0))
    assert layer.features["class"].iloc[-1] == "Tumor"  # detached: napari's defaults again


def test_pasted_and_assigned_shapes_get_the_active_class(tmp_path):
    layer, pal, _ = _attached(_geojson_layer(tmp_path))
    assert layer.features["class"].tolist() == ["Stroma", ""]  # existing shapes keep theirs
    pal.set_active("Tumor")
    layer.selected_data = {0}
    layer._copy_data()  # napari's Ctrl+C / Ctrl+V
    layer._paste_data()
    assert len(layer.data) == 3
    feats = layer.features
    assert feats["class"].tolist() == ["Stroma", "", "Tumor"]
    # a copy is a new object, not a part of the imported QuPath object it came from
    assert feats["annotation"].tolist()[-1] == -1 and feats["part"].tolist()[-1] == 0
    np.testing.assert_allclose(layer.edge_color[2, :3], _rgb(pal, "Tumor"))
    np.testing.assert_allclose(layer.edge_color[0, :3], _rgb(pal, "Stroma"))
    # removing and editing shapes does not reclassify anything
    layer.selected_data = {1}
    layer.remove_selected()
    layer.data = [d + 1.0 for d in layer.data]
    assert layer.features["class"].tolist() == ["Stroma", "Tumor"]
    # data given to an empty layer are new shapes
    empty, pal2, _ = _attached(active="Stroma")
    empty.data = [_rect(0, 0), _rect(20, 20)]
    assert empty.features["class"].tolist() == ["Stroma", "Stroma"]


def test_drawing_with_the_mouse_model_gets_the_active_class():
    """napari adds a drawn shape on mouse press (ADDING) and completes it on release (ADDED);
    the shape has its class while it is being drawn already."""
    layer, pal, _ = _attached(active="Stroma")
    layer.add_rectangles(_rect(0, 0))
    layer.selected_data = {0}
    pal.set_active("Tumor")
    layer.add(_rect(20, 20), shape_type="rectangle", gui=True)  # what a mouse press does
    assert layer.features["class"].tolist() == ["Stroma", "Tumor"]  # while drawing
    np.testing.assert_allclose(layer.edge_color[1, :3], _rgb(pal, "Tumor"))
    layer._is_creating = True
    layer._finish_drawing()  # what the mouse release does
    assert layer.features["class"].tolist() == ["Stroma", "Tumor"]
    np.testing.assert_allclose(layer.edge_color[1, :3], _rgb(pal, "Tumor"))


# --- 3. prediction layers over a translated slide -----------------------------------------------


def _grid_coords(x0=37, y0=11, stride=64, rows=5, cols=6, drop=(3, 7, 17)):
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = np.stack([x0 + xs.ravel() * stride, y0 + ys.ravel() * stride], 1).astype(np.int64)
    return np.delete(coords, list(drop), axis=0)


def _rasters(coords, psize, names):
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(len(names)), size=len(coords))
    out = {"classes": labels_raster(proba.argmax(1), coords, psize, MPP, shift=1),
           "entropy": heatmap_raster(rng.random(len(coords)), coords, psize, MPP)}
    for i, n in enumerate(names):
        out[f"p:{n}"] = heatmap_raster(proba[:, i], coords, psize, MPP)
    return out, proba


@pytest.mark.parametrize("psize,stride", [(64, 64), (128, 64)])
def test_prediction_layers_cover_patch_footprints_on_a_translated_slide(psize, stride):
    coords = _grid_coords(stride=stride)
    names = ["Tumor", "Stroma", "Fat"]
    rasters, proba = _rasters(coords, psize, names)
    vm = ViewerModel()
    h = int(coords[:, 1].max() + psize + 5)
    w = int(coords[:, 0].max() + psize + 5)
    vm.add_image(np.zeros((h, w), np.uint8), scale=(MPP, MPP), name="left")
    right = vm.add_image(np.zeros((h, w), np.uint8), scale=(MPP, MPP), translate=(0, 2000.0),
                         name="right")
    offset = tuple(right.translate[-2:])
    out = prediction_layer_data(rasters, names, None, "right", offset=offset)
    assert [k for *_, k in out] == ["labels", "image", "image", "image", "image"]
    layers = [getattr(vm, f"add_{k}")(d, **kw) for d, kw, k in out]
    g = rasters["classes"].grid
    for layer in layers:
        for i, (x, y) in enumerate(coords):
            r, c = g.rows[i], g.cols[i]
            lo = layer.data_to_world((r - 0.5, c - 0.5))
            hi = layer.data_to_world((r + g.k - 0.5, c + g.k - 0.5))
            # the patch's level-0 pixels x..x+P-1 of the right-hand slide, in world units
            want_lo = right.data_to_world((y - 0.5, x - 0.5))
            want_hi = right.data_to_world((y + psize - 0.5, x + psize - 0.5))
            np.testing.assert_allclose(lo, want_lo, atol=1e-9)
            np.testing.assert_allclose(hi, want_hi, atol=1e-9)
    # the value under each patch centre of the right-hand slide is that patch's
    cls, p_fat = layers[0], layers[3]
    for i, (x, y) in enumerate(coords):
        if stride != psize:
            break
        centre = right.data_to_world((y + psize / 2 - 0.5, x + psize / 2 - 0.5))
        r, c = np.round(cls.world_to_data(centre)).astype(int)
        assert cls.data[r, c] == proba[i].argmax() + 1
        r, c = np.round(p_fat.world_to_data(centre)).astype(int)
        assert p_fat.data[r, c] == pytest.approx(proba[i, 2], abs=1e-6)
    # no offset: the maps lie over the left-hand slide, 2000 µm away
    plain = prediction_layer_data(rasters, names, None, "left")
    for (_, kw, _), (_, kw_off, _) in zip(plain, out, strict=True):
        np.testing.assert_allclose(np.subtract(kw_off["translate"], kw["translate"]),
                                   (0.0, 2000.0))
        np.testing.assert_allclose(kw_off["scale"], kw["scale"])


def test_single_prediction_layer_functions_take_an_offset():
    coords = _grid_coords()
    rasters, _ = _rasters(coords, 64, ["A", "B"])
    off = (12.5, -300.0)
    base = np.asarray(rasters["classes"].grid.translate)
    kws = [al.class_map_layer_data(rasters["classes"], ["A", "B"], None, "c", offset=off)[1],
           al.probability_layer_data(rasters["p:A"], "A", (255, 0, 0), "p", offset=off)[1],
           al.uncertainty_layer_data(rasters["entropy"], "u", offset=off)[1]]
    for kw in kws:
        np.testing.assert_allclose(kw["translate"], base + off)
