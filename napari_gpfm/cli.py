"""``napari-gpfm`` command line: a dispatcher over each concern's ``_cli.register``."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# Each module exposes register(subparsers); the sub-command's func(args) returns the exit code.
COMMAND_MODULES = [
    "napari_gpfm._qt._cli",
    "napari_gpfm.encoders._cli",
    "napari_gpfm.embeddings._cli",
    "napari_gpfm.distill._cli",
    "napari_gpfm.analyses._cli",
    "napari_gpfm.analyses.pathotune_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-gpfm",
        description="Whole-slide images and GPFM foundation-model embeddings, in napari and headless.",
    )
    parser.add_argument("--version", action="version", version=f"napari-gpfm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .slide import SlideError

    try:
        return int(args.func(args) or 0)
    except SlideError as exc:
        print(f"napari-gpfm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-gpfm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
