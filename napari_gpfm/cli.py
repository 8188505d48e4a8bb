"""``napari-gpfm`` command line: a dispatcher over each concern's ``_cli.register``.

One error rule for every sub-command: a :class:`~napari_gpfm.errors.NapariGpfmError` (bad input:
a missing or unreadable file, a model, recipe or option that cannot work) or an ``OSError``
becomes one ``error: <message>`` line on stderr and exit code 2. Any other exception is a bug
and prints its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import NapariGpfmError, error_line

# Each module exposes register(subparsers); the sub-command's func(args) returns the exit code.
COMMAND_MODULES = [
    "napari_gpfm.viewer_cli",
    "napari_gpfm.encoders._cli",
    "napari_gpfm.jobs._cli",
    "napari_gpfm.jobs._classify_cli",
    "napari_gpfm.distill._cli",
    "napari_gpfm.pathotune._cli",
]

#: Exit code of a command refused for bad input (argparse uses the same for bad arguments).
EXIT_BAD_INPUT = 2


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


def run(args: argparse.Namespace) -> int:
    """Run a parsed sub-command; bad input becomes one ``error:`` line and exit code 2."""
    try:
        return int(args.func(args) or 0)
    except (NapariGpfmError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("napari-gpfm: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
