"""The canvas mouse helper (tests/_qt/mouse.py): real Qt mouse events land where asked."""

from __future__ import annotations

import numpy as np
import pytest
from mouse import (
    canvas_to_world,
    canvas_widget,
    click,
    draw_rectangle,
    world_to_canvas,
    world_to_canvas_xy,
)

from napari_gpfm.annotations.classes import ClassPalette
from napari_gpfm.layers.annotation_layers import apply_class_colours, attach_active_class

MPP = 0.5


@pytest.fixture
def viewer(make_napari_viewer, qtbot):
    """A shown viewer over a 400 x 600 µm image (slide-like scale), camera on a known view."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1000, 800)
    viewer.add_image(np.zeros((800, 1200), np.uint8), scale=(MPP, MPP), name="slide")
    qtbot.wait(50)  # let the layout give the canvas its final size
    viewer.scene.camera.center = (150.0, 250.0)
    viewer.scene.camera.zoom = 2.0  # 2 screen px per µm: one screen pixel = 0.5 µm
    return viewer


HALF_PIXEL = 0.5 / 2.0 + 1e-6  # QPoint rounding, in µm at zoom 2
PIXEL = 1.0 / 2.0 + 1e-6


def _corners(shape_data, layer):
    world = np.array([layer.data_to_world(v) for v in shape_data])
    return world.min(0), world.max(0)


def test_world_to_canvas_round_trips(viewer, qtbot):
    widget = canvas_widget(viewer)
    w, h = widget.width(), widget.height()
    assert w > 200 and h > 200
    for world in [(150.0, 250.0), (100.0, 200.0), (190.25, 311.75)]:
        xy = world_to_canvas_xy(viewer, world)
        assert 0 <= xy[0] < w and 0 <= xy[1] < h
        np.testing.assert_allclose(canvas_to_world(viewer, xy), world, atol=1e-6)
        pos = world_to_canvas(viewer, world)
        np.testing.assert_allclose(canvas_to_world(viewer, pos), world,
                                   atol=HALF_PIXEL)
    # the camera centre is the canvas centre
    cx, cy = world_to_canvas_xy(viewer, viewer.scene.camera.center[-2:])
    assert abs(cx - w / 2) <= 1 and abs(cy - h / 2) <= 1
    # a real mouse move there puts napari's cursor at that world position
    pos = world_to_canvas(viewer, (120.0, 230.0))
    qtbot.mouseMove(widget, pos)
    qtbot.wait(30)
    np.testing.assert_allclose(viewer.cursor.position[-2:], (120.0, 230.0),
                               atol=HALF_PIXEL)


def test_draw_rectangle_lands_on_requested_world_corners(viewer, qtbot):
    layer = viewer.add_shapes(ndim=2, scale=(MPP, MPP), name="shapes")
    other = viewer.layers["slide"]
    viewer.layers.selection.active = other
    draw_rectangle(qtbot, viewer, layer, (110.0, 205.0), (170.5, 290.0))
    assert len(layer.data) == 1 and layer.shape_type == ["rectangle"]
    lo, hi = _corners(layer.data[0], layer)
    np.testing.assert_allclose(lo, (110.0, 205.0), atol=PIXEL)
    np.testing.assert_allclose(hi, (170.5, 290.0), atol=PIXEL)
    assert layer.mode == "pan_zoom"
    # drawn from the lower-right corner to the upper-left one: the same box
    draw_rectangle(qtbot, viewer, layer, (180.0, 300.0), (130.0, 220.0))
    assert len(layer.data) == 2
    lo, hi = _corners(layer.data[1], layer)
    np.testing.assert_allclose(lo, (130.0, 220.0), atol=PIXEL)
    np.testing.assert_allclose(hi, (180.0, 300.0), atol=PIXEL)


def test_click_selects_the_shape_under_the_mouse(viewer, qtbot):
    layer = viewer.add_shapes(ndim=2, scale=(MPP, MPP), name="shapes")
    draw_rectangle(qtbot, viewer, layer, (110.0, 205.0), (140.0, 240.0))
    draw_rectangle(qtbot, viewer, layer, (150.0, 260.0), (180.0, 300.0))
    layer.mode = "select"
    layer.selected_data = set()
    click(qtbot, viewer, (165.0, 280.0))
    assert layer.selected_data == {1}
    click(qtbot, viewer, (125.0, 220.0))
    assert layer.selected_data == {0}


def test_drawn_shapes_get_the_class_active_when_drawn(viewer, qtbot):
    palette = ClassPalette([("Tumor", None), ("Stroma", None)], active="Tumor")
    layer = viewer.add_shapes(ndim=2, scale=(MPP, MPP), name="annotations")
    apply_class_colours(layer, palette)
    detach = attach_active_class(layer, lambda: palette.active, palette)
    draw_rectangle(qtbot, viewer, layer, (110.0, 205.0), (140.0, 240.0))
    # selecting the Tumor shape then switching class: napari would copy the selected shape's
    # class/colour into the defaults; the next drawn shape must still be Stroma
    layer.selected_data = {0}
    palette.set_active("Stroma")
    draw_rectangle(qtbot, viewer, layer, (150.0, 260.0), (180.0, 300.0))
    assert layer.features["class"].tolist() == ["Tumor", "Stroma"]
    np.testing.assert_allclose(layer.edge_color[0, :3], np.array(palette.colour("Tumor")) / 255)
    np.testing.assert_allclose(layer.edge_color[1, :3], np.array(palette.colour("Stroma")) / 255)
    detach()
    palette.set_active("Tumor")
    layer.feature_defaults = {"class": "Stroma", "annotation": -1, "part": 0}
    draw_rectangle(qtbot, viewer, layer, (100.0, 310.0), (120.0, 330.0))
    assert layer.features["class"].tolist() == ["Tumor", "Stroma", "Stroma"]  # detached
