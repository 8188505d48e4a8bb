"""Drive napari-gpfm like a user: slides through File > Open, docks through the Plugins menu.

napari's Plugins menu calls ``viewer.window.add_plugin_dock_widget("napari-gpfm", <display
name>)``, which hands each dock its *own* ``PublicOnlyProxy`` of the viewer; tests that add the
docks the same way catch results that do not cross from one dock to another. Buttons are
clicked with the mouse (``qtbot.mouseClick``) after checking that the user can see and press
them, so a slot that mishandles Qt's ``clicked(bool)`` argument fails here as it would in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gpfm_helpers import TINY, use_tiny_model, write_tiny_card

PLUGIN = "napari-gpfm"

#: Short names -> the display names of napari.yaml's widget contributions (the menu entries).
DOCKS = {
    "info": "Slide info",
    "gpfm": "GPFM",
    "plot": "Embedding plot",
    "annotate": "Annotate and classify",
    "pathotune": "PathoTune (prompt tuning)",
    "distill": "Finetune (distillation)",
}

__all__ = ["DOCKS", "PLUGIN", "TINY", "add_dock", "click", "draw_rectangle", "embed",
           "new_shapes_from_menu", "open_slide", "setup_gpfm", "world_rect", "write_tiny_card"]


def add_dock(viewer: Any, name: str) -> Any:
    """Plugins > napari-gpfm > ``name`` (a key of :data:`DOCKS` or a display name); returns
    the dock's widget."""
    from qtpy.QtWidgets import QApplication

    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, DOCKS.get(name, name))
    assert dock.widget() is not None
    for _ in range(20):  # a shown window shows a new dock on the next turn of the event loop
        QApplication.processEvents()
        if dock.isVisible() or not dock.window().isVisible():
            break
    return widget


def open_slide(viewer: Any, path: str | Path, translate: tuple[float, float] | None = None
               ) -> Any:  # fmt: skip
    """File > Open with napari-gpfm's reader; optionally move the slide (world µm, y x)."""
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    if translate is not None:
        layer.translate = translate
    return layer


def click(qtbot: Any, button: Any) -> None:
    """A left click on a button the user can see and press (on screen when its window is
    shown, as in the acceptance suite; else not hidden within its window)."""
    from qtpy.QtCore import Qt

    assert button.isEnabled(), f"{button.text()!r} is disabled"
    if button.window().isVisible():
        assert button.isVisible(), f"{button.text()!r} is not visible"
    else:
        assert button.isVisibleTo(button.window()), f"{button.text()!r} is hidden"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def setup_gpfm(viewer: Any, out_dir: str | Path, patch_size: int = 112,
               batch_size: int = 16) -> Any:  # fmt: skip
    """The GPFM dock from the Plugins menu, set to the tiny random model (``NAPARI_GPFM_MODELS_DIR``
    must hold its card: :func:`write_tiny_card`), custom ``patch_size`` px at 0.5 µm/px and
    output in ``out_dir``."""
    w = add_dock(viewer, "gpfm")
    w.random_check.setChecked(True)
    use_tiny_model(w, out_dir, patch_size, batch_size)
    w.num_workers = 0
    return w


def embed(qtbot: Any, gpfm: Any, slide_layer: Any, timeout: int = 120_000) -> Any:
    """Pick ``slide_layer`` in the GPFM dock and click "Compute embeddings"; returns the store."""
    gpfm.layer_combo.setCurrentIndex(gpfm.layer_combo.findData(int(slide_layer.unique_id)))
    with qtbot.waitSignal(gpfm.run_finished, timeout=timeout) as blocker:
        click(qtbot, gpfm.compute_button)
    assert blocker.args == ["done"], gpfm.status.text()
    s = gpfm.session.slide(slide_layer)
    assert s.has_store and s.n > 0
    return s.store


def world_rect(slide_layer: Any, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Corners (world µm, y x) of the level-0 pixel box ``[x0, x1) × [y0, y1)`` of a slide
    layer (its scale and translate applied): a rectangle in a Shapes layer of scale 1."""
    corners = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float) - 0.5
    return np.array([slide_layer.data_to_world(c) for c in corners])[:, -2:]


def draw_rectangle(layer: Any, world_corners: np.ndarray) -> None:
    """Add a rectangle to a Shapes layer at world positions (as drawn with the mouse)."""
    data = np.array([layer.world_to_data(p) for p in world_corners])[:, -2:]
    layer.add_rectangles(data)


def new_shapes_from_menu(viewer: Any) -> Any:
    """File > New Layer > Shapes (napari's own action: with a slide layer selected, the new
    layer copies its scale and translate); returns the new layer."""
    from napari._app_model import get_app_model

    before = {int(la.unique_id) for la in viewer.layers}
    get_app_model().commands.execute_command("napari.window.file.new_layer.new_shapes").result()
    (layer,) = [la for la in viewer.layers if int(la.unique_id) not in before]
    return layer
