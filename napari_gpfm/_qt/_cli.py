"""``napari-gpfm view``: open slides in the napari viewer (arguments: :mod:`napari_gpfm.viewer_cli`).

``--headless`` renders off-screen (no display needed) and writes a screenshot instead of
opening a window.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run_view(args: argparse.Namespace) -> int:
    if args.headless:
        from ._display import ensure_display

        ensure_display()
    import napari

    from .._resources import sample_slide_path
    from ..layers.reader import set_layer_mpp
    from ..slide import open_slide

    slides = [Path(s) for s in args.slides] or [sample_slide_path()]
    for path in slides:  # bad files are refused before a window opens
        open_slide(path, mpp=args.mpp).close()
    viewer = napari.Viewer(title="napari-gpfm", show=not args.headless)
    for path in slides:  # as File > Open does, and the Slide info dock as the Plugins menu does
        for layer in viewer.open(str(path), plugin="napari-gpfm"):
            if args.mpp is not None:
                set_layer_mpp(layer, args.mpp)
    viewer.window.add_plugin_dock_widget("napari-gpfm", "Slide info")
    viewer.scale_bar.visible = True
    viewer.window._qt_window.resize(1400, 900)
    viewer.reset_view()
    screenshot = args.screenshot or (args.out / "screenshot.png" if args.headless else None)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        from qtpy.QtWidgets import QApplication

        QApplication.processEvents()
        viewer.screenshot(str(screenshot), canvas_only=False)
        print(f"screenshot: {screenshot}")
    if args.headless:
        viewer.close()
        return 0
    napari.run()
    return 0
