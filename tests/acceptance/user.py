"""What a user does, as functions: open a slide, add a dock from the Plugins menu, click.

The first steps (``open_slide``, ``add_dock``, ``click``) are tests/_qt/plugin_docks.py's, shared
with the dock tests; this module adds the acceptance suite's scenes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from gpfm_helpers import TINY
from mouse import draw_rectangle
from plugin_docks import PLUGIN, add_dock, click, open_slide
from qtpy.QtCore import Qt

__all__ = ["PLUGIN", "add_class", "add_dock", "choose_class", "class_maps", "click", "compute",
           "draw_two_classes", "gpfm_dock", "new_window", "open_slide", "region", "snap",
           "start_annotating", "tick", "two_regions", "write_white_slide"]


def new_window(make_napari_viewer):
    """A shown napari window (offscreen platform) of a laptop's size."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    return viewer


def tick(qtbot, box) -> None:
    """Click a check box on its indicator (a wide box's centre may be empty space)."""
    from qtpy.QtCore import QPoint, Qt

    assert box.isVisible() and box.isEnabled()
    qtbot.mouseClick(box, Qt.MouseButton.LeftButton, pos=QPoint(6, box.height() // 2))


def gpfm_dock(viewer, qtbot, patch_size: int = 112):
    """The GPFM dock set up as a user would for the tiny model: random weights ticked, the
    model picked, custom 112 px patches at 0.5 µm/px."""
    dock = add_dock(viewer, "GPFM")
    if not dock.random_check.isChecked():
        tick(qtbot, dock.random_check)
    assert dock.random_check.isChecked()
    dock.model_combo.setCurrentIndex(dock.model_combo.findData(TINY))
    dock.preset_combo.setCurrentText("custom")
    dock.mpp_spin.setValue(0.5)
    dock.size_spin.setValue(patch_size)
    dock.batch_size = 16  # speed only (not a user setting)
    return dock


def compute(qtbot, dock, expect: str = "done", timeout: int = 120_000) -> str:
    """Click Compute embeddings and wait for the job to end."""
    with qtbot.waitSignal(dock.jobs.finished, timeout=timeout, raising=False) as blocker:
        click(qtbot, dock.compute_button)
        assert dock.jobs.busy, f"Compute did not start: {dock.status.text()}"
    assert blocker.signal_triggered, f"no end: {dock.status.text()!r} {dock.jobs.last_progress}"
    assert blocker.args == [expect], dock.status.text()
    return dock.status.text()


def write_white_slide(path: Path, size: int = 2048, mpp: float = 0.5) -> Path:
    """A tiled, 2-level pyramid of plain white (no tissue anywhere)."""
    img = np.full((size, size, 3), 255, np.uint8)
    res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(256, 256), compression="jpeg", photometric="rgb", **res)
        tif.write(img[::2, ::2].copy(), tile=(256, 256), compression="jpeg", photometric="rgb",
                  subfiletype=1)
    return path


def snap(viewer, name: str) -> None:
    """With ``NAPARI_GPFM_SCREENSHOTS=<folder>``, save the whole window as ``<name>.png`` (to
    look at what a user sees; nothing is asserted on the picture)."""
    import os

    folder = os.environ.get("NAPARI_GPFM_SCREENSHOTS")
    if folder:
        from qtpy.QtWidgets import QApplication

        for _ in range(10):
            QApplication.processEvents()
        Path(folder).mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(Path(folder) / f"{name}.png"), canvas_only=False)


# ------------------------------------------------------------------ classes and regions
def add_class(qtbot, annotate, name: str) -> None:
    """Type a class name and click Add."""
    annotate.class_name_edit.clear()
    qtbot.keyClicks(annotate.class_name_edit, name)
    click(qtbot, annotate.add_button)


def choose_class(qtbot, annotate, name: str) -> None:
    """Click the class in the list."""
    items = annotate.class_list.findItems(name, Qt.MatchFlag.MatchExactly)
    assert items, f"no class {name!r} in the list"
    rect = annotate.class_list.visualItemRect(items[0])
    qtbot.mouseClick(annotate.class_list.viewport(), Qt.MouseButton.LeftButton,
                     pos=rect.center())  # fmt: skip
    assert annotate.session.palette.active == name


def region(state, indices) -> tuple[np.ndarray, np.ndarray]:
    """World corners (y, x) of the box around these patches, a little inside their edges."""
    boxes = state.boxes(indices).reshape(-1, 2)
    lo, hi = boxes.min(0), boxes.max(0)
    pad = 0.1 * (hi - lo).min()
    return lo + pad, hi - pad


def class_maps(viewer, uid) -> list:
    return [la for la in viewer.layers
            if la.metadata.get("napari_gpfm", {}).get("kind") == "class-map"
            and la.metadata["napari_gpfm"].get("slide_uid") == uid]  # fmt: skip


def two_regions(state):
    """Two groups of 4 neighbouring patches far apart (top and bottom of the tissue)."""
    order = np.lexsort((state.coords[:, 0], state.coords[:, 1]))
    P = state.patch_size_level0
    where = {tuple(c): i for i, c in enumerate(state.coords.tolist())}

    def block(start):
        for i in start:
            x, y = state.coords[i]
            quad = [where.get((x + dx, y + dy)) for dx, dy in ((P, 0), (0, P), (P, P))]
            if None not in quad:
                return [int(i), *quad]
        raise AssertionError("no 2x2 block of patches")

    return block(order), block(order[::-1])


def start_annotating(viewer, qtbot, annotate, classes=("Tumour", "Stroma")):
    """The classes added in the Annotate dock, a new annotation layer from its button and the
    view reset (so the slide fills the canvas); returns the Shapes layer."""
    for name in classes:
        add_class(qtbot, annotate, name)
    click(qtbot, annotate.new_layer_button)
    viewer.reset_view()
    qtbot.wait(100)
    return annotate.annotation_layer()


def draw_two_classes(viewer, qtbot, annotate, shapes, state):
    """With the mouse: a Tumour rectangle over a 2x2 block of patches at the top of the tissue
    and a Stroma one at the bottom; returns the two blocks' patch indices."""
    top, bottom = two_regions(state)
    choose_class(qtbot, annotate, "Tumour")
    draw_rectangle(qtbot, viewer, shapes, *region(state, top))
    choose_class(qtbot, annotate, "Stroma")
    draw_rectangle(qtbot, viewer, shapes, *region(state, bottom))
    return top, bottom
