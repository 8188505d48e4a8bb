"""``napari-gpfm view`` and ``napari-gpfm demo``: their arguments, registered without importing
napari or Qt (every other sub-command starts faster that way); the commands import the viewer
code (:mod:`napari_gpfm._qt`) only when they run."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    view = sub.add_parser("view", help="open whole-slide images in napari")
    view.add_argument("slides", nargs="*",
                      help="slide files or DICOM folders (default: the bundled sample)")
    _viewer_options(view)
    view.set_defaults(func=_run_view)

    demo = sub.add_parser(
        "demo",
        help="the main job on the bundled sample slide: embeddings, clusters, heatmaps, similarity",
    )
    _viewer_options(demo)
    demo.add_argument("--model", help="registry model name (default: default_model_name())")
    demo.add_argument("--k", type=int, default=4, help="number of k-means clusters (default 4)")
    demo.add_argument("--random-weights", action="store_true",
                      help="testing only: use a randomly initialised model when weights are "
                           "missing")
    demo.add_argument("--docs-images", type=Path, help=argparse.SUPPRESS)  # docs/images refresh
    demo.set_defaults(func=_run_demo, slides=[], out=None)


def _viewer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mpp", type=float, help="pixel size in µm/px when the file does not record it")
    p.add_argument("--headless", action="store_true",
                   help="render off-screen; write a screenshot and exit")
    p.add_argument("--screenshot", type=Path, help="write a PNG of the viewer to this path")
    p.add_argument("--out", type=Path, default=Path("napari_gpfm_out"),
                   help="output folder (headless)")


def _run_view(args: argparse.Namespace) -> int:
    from ._qt._cli import run_view

    return run_view(args)


def _run_demo(args: argparse.Namespace) -> int:
    from ._qt.demo import run_demo

    return run_demo(args)
