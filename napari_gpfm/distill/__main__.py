"""``python -m napari_gpfm.distill --config FILE [key=value ...]`` (the torchrun entry point)."""

from __future__ import annotations

import argparse
import sys

from ._cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_gpfm.distill")
    commands = parser.add_subparsers(dest="command")
    register(commands)
    args = parser.parse_args(["distill", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
