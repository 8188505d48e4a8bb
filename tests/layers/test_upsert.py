"""convert.upsert_layer: update in place or rebuild at the same index, show the layer, leave the
user's layer selection alone. No Qt: napari's ViewerModel."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_gpfm.analyses.heatmap import heatmap_raster, labels_raster
from napari_gpfm.layers import annotation_layers, convert

MPP = 0.499


def _coords(n=12, stride=64):
    ys, xs = np.divmod(np.arange(n), 4)
    return np.stack([11 + xs * stride, 37 + ys * stride], 1).astype(np.int64)


def _heat(name="h", seed=0, **kw):
    c = _coords()
    v = np.random.default_rng(seed).random(len(c))
    return convert.heatmap_layer_data(heatmap_raster(v, c, 64, MPP), name, **kw)


def _classes(name="c", colours=None):
    c = _coords()
    r = labels_raster(np.arange(len(c)) % 3, c, 64, MPP)
    return convert.labels_layer_data(r, name, colours=colours)


def _hits_shapes(n, name="slide top hits"):
    """A Shapes "top hits" layer: n boxes, ranked labels as text, per-shape colours."""
    boxes = convert.patch_boxes_world(_coords(max(n, 1))[:n], 64, MPP)
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "edge_color": ["magenta"] * (n - 1) + ["cyan"] if n else "magenta",
        "face_color": "transparent",
        "edge_width": 2,
        "features": {"rank": np.arange(1, n + 1), "score": np.linspace(1, 0, n)},
        "text": {"string": "{rank}", "color": "white", "size": 10},
    }
    if n == 0:
        kwargs.pop("shape_type")
        kwargs["ndim"] = 2
    return (list(boxes), kwargs, "shapes")


def _viewer_with(*names):
    vm = ViewerModel()
    for n in names:
        vm.add_image(np.zeros((8, 8)), name=n)
    return vm


# --- 4a. shapes whose number changes ------------------------------------------------------------


def test_shapes_layer_updates_with_a_different_number_of_shapes():
    vm = _viewer_with("slide", "other")
    first = convert.upsert_layer(vm, _hits_shapes(3))
    index = vm.layers.index(first)
    for n in (6, 1, 0, 4, 4):
        layer = convert.upsert_layer(vm, _hits_shapes(n))
        assert [la.name for la in vm.layers].count("slide top hits") == 1
        assert vm.layers.index(layer) == index
        assert len(layer.data) == n and len(layer.features) == n
        assert layer.features["rank"].tolist() == list(range(1, n + 1))
        assert [str(s) for s in layer.text.values] == [str(r) for r in range(1, n + 1)]
        assert len(layer.edge_color) == n
        if n:
            np.testing.assert_allclose(layer.edge_color[-1], [0, 1, 1, 1])  # cyan
            np.testing.assert_allclose(layer.data[0], _hits_shapes(n)[0][0])


def test_points_top_hits_update_in_place_with_a_different_count():
    vm = _viewer_with("slide")
    boxes = convert.patch_boxes_world(_coords(), 64, MPP)
    first = convert.upsert_layer(vm, convert.top_hits_layer_data(boxes[:5], np.ones(5), "hits"))
    for n in (8, 2, 0, 3):
        layer = convert.upsert_layer(
            vm, convert.top_hits_layer_data(boxes[:n], np.linspace(1, 0, n), "hits"))
        assert layer is first
        assert len(layer.data) == n and len(layer.features) == n
        assert [str(s) for s in layer.text.values] == [str(r) for r in range(1, n + 1)]
        np.testing.assert_allclose(layer.data, boxes[:n].mean(1).reshape(-1, 2))


def test_raster_layers_update_in_place():
    vm = _viewer_with("slide")
    a = convert.upsert_layer(vm, _heat(seed=0))
    b = convert.upsert_layer(vm, _heat(seed=1, colormap="magma"))
    assert a is b and b.colormap.name == "magma"
    np.testing.assert_allclose(b.data, _heat(seed=1)[0], equal_nan=True)
    c = convert.upsert_layer(vm, _classes(colours=convert.cluster_colours(3)))
    red = np.array([[1.0, 0, 0, 1], [0, 1.0, 0, 1], [0, 0, 1.0, 1]])
    d = convert.upsert_layer(vm, _classes(colours=red))  # recoloured classes
    assert c is d
    np.testing.assert_allclose(d.colormap.map(np.array([1]))[0], [1, 0, 0, 1])


# --- 4b. an upsert shows the layer --------------------------------------------------------------


@pytest.mark.parametrize("make", [_heat, _classes, lambda: _hits_shapes(3),
                                  lambda: convert.top_hits_layer_data(
                                      np.zeros((2, 4, 2)), np.ones(2), "hits")])
def test_upsert_shows_a_layer_the_user_hid(make):
    vm = _viewer_with("slide")
    layer = convert.upsert_layer(vm, make())
    layer.visible = False
    again = convert.upsert_layer(vm, make())
    assert again.visible


def test_layers_added_hidden_keep_the_users_visibility():
    vm = _viewer_with("slide")
    c = _coords()
    p = convert.heatmap_layer_data(heatmap_raster(np.linspace(0, 1, len(c)), c, 64, MPP), "P")
    p[1]["visible"] = False  # as annotation_layers.probability_layer_data makes it
    layer = convert.upsert_layer(vm, p)
    assert not layer.visible
    assert not convert.upsert_layer(vm, p).visible  # not shown by an update
    layer.visible = True
    assert convert.upsert_layer(vm, p).visible  # nor hidden again
    # nor when the layer has to be rebuilt (here: another dimensionality)
    p3 = (np.zeros((2, 5, 5), np.float32), {"name": "P", "visible": False}, "image")
    rebuilt = convert.upsert_layer(vm, p3)
    assert rebuilt is not layer and rebuilt.visible


# --- 4c. another type under the same name -------------------------------------------------------


def test_a_layer_of_another_type_with_that_name_is_replaced_at_its_index():
    vm = _viewer_with("slide", "x", "other")
    assert type(vm.layers["x"]).__name__ == "Image"
    lab = convert.upsert_layer(vm, _classes(name="x"))
    assert type(lab).__name__ == "Labels" and vm.layers.index(lab) == 1 and len(vm.layers) == 3
    sh = convert.upsert_layer(vm, _hits_shapes(2, name="x"))
    assert type(sh).__name__ == "Shapes" and vm.layers.index(sh) == 1 and len(vm.layers) == 3
    im = convert.upsert_layer(vm, _heat(name="x"))
    assert type(im).__name__ == "Image" and vm.layers.index(im) == 1 and len(vm.layers) == 3
    # another dimensionality: rebuilt too
    flat = convert.upsert_layer(vm, (np.zeros((2, 5, 5), np.float32), {"name": "x"}, "image"))
    assert flat.data.ndim == 3 and vm.layers.index(flat) == 1


def test_set_or_add_layer_alias_is_gone():
    assert not hasattr(annotation_layers, "set_or_add_layer")
    assert "set_or_add_layer" not in annotation_layers.__all__


# --- 5. the user's layer selection is left alone ------------------------------------------------


def _state(vm):
    sel = vm.layers.selection
    return set(sel), sel.active, sel._current


@pytest.mark.parametrize("selected", [["slide"], ["slide", "annotations"], []])
def test_new_result_layers_do_not_take_the_selection(selected):
    vm = _viewer_with("slide", "annotations")
    sel = vm.layers.selection
    sel.clear()
    sel.update([vm.layers[n] for n in selected])
    if len(selected) == 1:
        sel._current = vm.layers[selected[0]]
    before = _state(vm)
    for make in (_heat, _classes, lambda: _hits_shapes(3),
                 lambda: convert.top_hits_layer_data(np.zeros((2, 4, 2)), np.ones(2), "hits")):
        convert.upsert_layer(vm, make())
        assert _state(vm) == before
    assert len(vm.layers) == 6


def test_a_selected_layer_that_is_rebuilt_stays_selected():
    vm = _viewer_with("slide")
    hits = convert.upsert_layer(vm, _hits_shapes(2))
    vm.layers.selection.active = hits
    new = convert.upsert_layer(vm, _hits_shapes(5))
    assert vm.layers.selection.active is new and set(vm.layers.selection) == {new}
    # updated in place: nothing moves
    vm.layers.selection.active = vm.layers["slide"]
    convert.upsert_layer(vm, _heat())
    convert.upsert_layer(vm, _heat(seed=2))
    assert vm.layers.selection.active is vm.layers["slide"]


# --- colour bars: built a tick after the layer, and for hidden maps only once shown -------------


def test_colour_bar_waits_for_the_next_tick_and_for_a_hidden_map_to_be_shown():
    vm = ViewerModel()
    queued = []
    convert.set_deferrer(queued.append)  # what the Qt docks set: QTimer.singleShot(0, fn)
    try:
        shown = convert.upsert_layer(vm, _heat("shown"))
        hidden_data = _heat("hidden")
        hidden_data[1]["visible"] = False  # as probability and uncertainty maps are added
        hidden = convert.upsert_layer(vm, hidden_data)
        assert not shown.colorbar.visible and not hidden.colorbar.visible  # not in this tick
        assert len(queued) == 2
        for fn in queued:
            fn()  # the next tick
        assert shown.colorbar.visible and shown.colorbar.box
        assert not hidden.colorbar.visible  # napari would build a bar nobody sees
        hidden.visible = True  # the user ticks the map on
        assert hidden.colorbar.visible
        hidden.visible = False
        hidden.visible = True  # shown once; no second hook
        assert hidden.colorbar.visible
    finally:
        convert.set_deferrer(None)
    later = convert.upsert_layer(vm, _heat("headless"))  # no deferrer: at once
    assert later.colorbar.visible


def test_an_unchanged_features_table_is_not_set_again():
    vm = ViewerModel()
    data = _classes("c")
    data[1]["features"] = {"index": np.arange(4), "class": ["none", "a", "b", "c"]}
    layer = convert.upsert_layer(vm, data)
    sets = []
    layer.events.features.connect(lambda e: sets.append(e))
    again = _classes("c")
    again[1]["features"] = {"index": np.arange(4), "class": ["none", "a", "b", "c"]}
    assert convert.upsert_layer(vm, again) is layer
    assert len(sets) == 1  # napari's own, from the new data; the same table is not set again
    renamed = _classes("c")
    renamed[1]["features"] = {"index": np.arange(4), "class": ["none", "a", "b", "d"]}
    convert.upsert_layer(vm, renamed)
    assert len(sets) == 3 and list(layer.features["class"]) == ["none", "a", "b", "d"]
