"""Every dock, opened from the Plugins menu in a 1280×800 window, shows its controls whole:
nothing cut off at the side (long docks scroll vertically)."""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import QAbstractButton, QApplication, QComboBox, QLineEdit
from user import PLUGIN, new_window, open_slide

DOCKS = ["Slide info", "GPFM", "Embedding plot", "Annotate and classify",
         "PathoTune (prompt tuning)", "Finetune (distillation)", "Project (slide list)"]  # fmt: skip


def clipped_controls(widget) -> list[str]:
    """Visible buttons, combo boxes and text fields narrower on screen than they are."""
    out = []
    for c in widget.findChildren((QAbstractButton, QComboBox, QLineEdit)):
        if not c.isVisible():
            continue
        shown = c.visibleRegion().boundingRect()
        if shown.height() > 0 and shown.width() < c.width() - 1:
            text = c.text() if hasattr(c, "text") else c.currentText()
            out.append(f"{type(c).__name__} {text!r}: {shown.width()} of {c.width()} px")
    return out


@pytest.mark.parametrize("name", DOCKS)
def test_no_control_is_cut_off(make_napari_viewer, sample_svs, name):
    viewer = new_window(make_napari_viewer)
    open_slide(viewer, sample_svs)
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    for _ in range(30):
        QApplication.processEvents()
    assert dock.isVisible()
    assert clipped_controls(widget) == []
