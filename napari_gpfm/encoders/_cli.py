"""``napari-gpfm models``: every model card, whether its weights are here, and downloads."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .card import ModelCard
from .registry import list_cards

_COLUMNS = (("name", "NAME"), ("gpfm", "GPFM"), ("embed_dim", "DIM"), ("weights", "WEIGHTS"),
            ("license", "LICENCE"), ("gated", "GATED"), ("path", "PATH"))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` sub-command."""
    parser = subparsers.add_parser(
        "models",
        help="list models and whether their weights are present; download weights",
        description="List every model card (bundled and user-trained) with its embedding size, "
        "whether its weights were found and where, its licence and whether access is gated.",
    )
    parser.add_argument("--download", metavar="NAME",
                        help="download the weights of model NAME to its default path (online)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    """Print the model table (or JSON), or download one model's weights; returns the exit code.
    An unknown model, a bad card or a failed download raise their ``EncoderError``, which the
    ``napari-gpfm`` dispatcher shows as one ``error:`` line with exit code 2."""
    if args.download:
        return _download(args.download, args.json)
    rows = [card_row(card) for card in list_cards()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        if any(row["weights"] == "missing" for row in rows):
            print("\nMissing weights: `napari-gpfm models --download NAME` when online, or put the "
                  "file at PATH (or set the model's environment variable, e.g. GPFM_WEIGHTS).")
    return 0


def card_row(card: ModelCard) -> dict[str, Any]:
    """One model as plain data (the JSON output)."""
    status = card.status()
    return {
        "name": card.name,
        "display_name": card.display_name,
        "is_gpfm": card.is_gpfm,
        "embed_dim": card.embed_dim,
        "weights": status.state,
        "path": str(status.path) if status.path is not None else None,
        "source": status.source,
        "env": card.weights.env,
        "license": card.license,
        "gated": card.gated,
        "card": str(card.path) if card.path is not None else None,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table of `card_row` dicts."""
    cells = [[title for _, title in _COLUMNS]]
    for row in rows:
        shown = {**row, "gpfm": "yes" if row["is_gpfm"] else "no",
                 "gated": "yes" if row["gated"] else "no", "path": row["path"] or "-"}
        cells.append([str(shown[key]) for key, _ in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def _download(name: str, as_json: bool) -> int:
    from .download import download_weights  # imports torch and huggingface_hub: only when asked

    path = download_weights(name)
    if as_json:
        print(json.dumps({"name": name, "path": str(path)}))
    else:
        print(f"{name}: weights at {path}")
    return 0
