"""Drive napari's canvas with real Qt mouse events (pytest-qt), for widget tests.

napari 0.9 has no public Qt handle: ``viewer.window.qt_viewer`` is deprecated (FutureWarning);
``viewer.window._qt_viewer.canvas`` is napari's ``VispyCanvas`` and its ``.native`` the Qt
widget that receives the mouse. A world point maps to canvas pixels through the vispy view
and camera transforms, the exact inverse of what napari does for every mouse event
(``VispyCanvas._map_canvas2world``: ``(view.transform * view.scene.transform).imap``), so a
point sent here arrives in napari at the requested world position (to within the rounding
to whole screen pixels: half a pixel per axis, i.e. ``0.5 / viewer.camera.zoom`` world units).

vispy drops mouse-move events less than 10 ms apart, so moves are spaced by :data:`STEP_MS`.

Usage::

    from mouse import click, draw_rectangle, world_to_canvas
    layer = draw_rectangle(qtbot, viewer, shapes, (10.0, 20.0), (50.0, 80.0))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QPoint, Qt

STEP_MS = 20  # > vispy's 10 ms mouse-move throttle

__all__ = [
    "canvas",
    "canvas_widget",
    "canvas_to_world",
    "world_to_canvas",
    "world_to_canvas_xy",
    "draw_rectangle",
    "click",
]


def canvas(viewer: Any) -> Any:
    """napari's ``VispyCanvas`` of a Qt viewer."""
    return viewer.window._qt_viewer.canvas


def canvas_widget(viewer: Any) -> Any:
    """The QWidget receiving the canvas' mouse events."""
    return canvas(viewer).native


def _transform(viewer: Any) -> Any:
    view = canvas(viewer).view
    return view.transform * view.scene.transform


def world_to_canvas_xy(viewer: Any, world_yx: Sequence[float]) -> tuple[float, float]:
    """Canvas position (x, y), in Qt logical pixels (float), of a point in the displayed dims.

    ``world_yx`` holds the world coordinates of the displayed dimensions in order (y, x).
    """
    displayed = [float(v) for v in world_yx][-viewer.dims.ndisplay :]
    mapped = np.asarray(_transform(viewer).map(displayed[::-1]), dtype=np.float64)
    if viewer.dims.ndisplay == 3:
        mapped = mapped / mapped[3]
    return float(mapped[0]), float(mapped[1])


def world_to_canvas(viewer: Any, world_yx: Sequence[float]) -> QPoint:
    """Canvas QPoint (whole pixels) of a world point (displayed dims, y then x)."""
    x, y = world_to_canvas_xy(viewer, world_yx)
    return QPoint(int(round(x)), int(round(y)))


def canvas_to_world(viewer: Any, pos: QPoint | Sequence[float]) -> np.ndarray:
    """World (y, x) of the displayed dims at canvas position ``pos`` (napari's own mapping)."""
    c = canvas(viewer)
    xy = (pos.x(), pos.y()) if isinstance(pos, QPoint) else tuple(float(v) for v in pos)
    world = c._map_canvas2world(xy, c.view)
    return np.asarray(world, dtype=np.float64)[list(viewer.dims.displayed)]


def _settle(qtbot: Any) -> None:
    qtbot.wait(STEP_MS)


def click(qtbot: Any, viewer: Any, world_yx: Sequence[float],
          button: Any = Qt.MouseButton.LeftButton, modifier: Any = None) -> QPoint:
    """Press and release ``button`` at a world point; returns the canvas point used."""
    widget = canvas_widget(viewer)
    pos = world_to_canvas(viewer, world_yx)
    mod = Qt.KeyboardModifier.NoModifier if modifier is None else modifier
    qtbot.mouseMove(widget, pos)
    _settle(qtbot)
    qtbot.mousePress(widget, button, mod, pos)
    _settle(qtbot)
    qtbot.mouseRelease(widget, button, mod, pos)
    _settle(qtbot)
    return pos


def draw_rectangle(qtbot: Any, viewer: Any, layer: Any, world_yx0: Sequence[float],
                   world_yx1: Sequence[float], steps: int = 4) -> Any:
    """Draw one rectangle on Shapes ``layer`` from ``world_yx0`` to ``world_yx1`` by mouse.

    Selects the layer (napari sends mouse events to the active layer), sets its mode to
    ``add_rectangle``, presses at the first corner, moves in ``steps`` steps and releases at
    the opposite corner, then sets the mode back to ``pan_zoom``. Returns the layer.
    """
    widget = canvas_widget(viewer)
    viewer.layers.selection.active = layer
    layer.mode = "add_rectangle"
    start = np.asarray(world_yx0, dtype=np.float64)
    end = np.asarray(world_yx1, dtype=np.float64)
    button, mod = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    try:
        p0 = world_to_canvas(viewer, start)
        qtbot.mouseMove(widget, p0)
        _settle(qtbot)
        qtbot.mousePress(widget, button, mod, p0)
        _settle(qtbot)
        for t in np.linspace(0.0, 1.0, max(1, int(steps)) + 1)[1:]:
            qtbot.mouseMove(widget, world_to_canvas(viewer, start + t * (end - start)))
            _settle(qtbot)
        qtbot.mouseRelease(widget, button, mod, world_to_canvas(viewer, end))
        _settle(qtbot)
    finally:
        layer.mode = "pan_zoom"
    return layer
