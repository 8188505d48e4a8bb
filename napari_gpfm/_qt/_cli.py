"""``napari-gpfm view`` and ``napari-gpfm demo``: open slides in the napari viewer.

``--headless`` renders off-screen (no display needed) and writes a screenshot instead of
opening a window.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    view = sub.add_parser("view", help="open whole-slide images in napari")
    view.add_argument("slides", nargs="*", help="slide files or DICOM folders (default: the bundled sample)")
    _viewer_options(view)
    view.set_defaults(func=run_view)

    demo = sub.add_parser(
        "demo",
        help="the main job on the bundled sample slide: embeddings, clusters, heatmaps, similarity",
    )
    _viewer_options(demo)
    from .demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(func=_run_demo, slides=[], out=None)


def _viewer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mpp", type=float, help="pixel size in µm/px when the file does not record it")
    p.add_argument("--headless", action="store_true", help="render off-screen; write a screenshot and exit")
    p.add_argument("--screenshot", type=Path, help="write a PNG of the viewer to this path")
    p.add_argument("--out", type=Path, default=Path("napari_gpfm_out"), help="output folder (headless)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def run_view(args: argparse.Namespace) -> int:
    if args.headless:
        from ._display import ensure_display

        ensure_display()
    import napari

    from .._resources import sample_slide_path
    from ..layers.reader import slide_layer_data
    from ..slide import open_slide
    from .slide_info import SlideInfoWidget

    slides = [Path(s) for s in args.slides] or [sample_slide_path()]
    viewer = napari.Viewer(title="napari-gpfm", show=not args.headless)
    for path in slides:
        data, kwargs, _ = slide_layer_data(open_slide(path, mpp=args.mpp))
        viewer.add_image(data, **kwargs)
    viewer.window.add_dock_widget(SlideInfoWidget(viewer), name="Slide info", area="right")
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
