"""The model registry: bundled cards first, then the user's models directory.

Bundled cards live in ``models/`` (inside the installed package as ``napari_gpfm/models``, at the
repository root in a source checkout). Trained students are written to the user models dir
(``$NAPARI_GPFM_MODELS_DIR``, default ``~/.local/share/napari-gpfm/models``); a user card with the
name of a bundled one replaces it. The folders are listed on every call, so new files and changed
environment variables are seen at once; a card file is parsed again only when its modification
time or size changed (docks list the cards on the main thread whenever a model is added).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .card import ModelCard
from .errors import EncoderError, ModelCardError, UnknownModelError, WeightsNotFoundError

MODELS_DIR_ENV = "NAPARI_GPFM_MODELS_DIR"
DEFAULT_USER_MODELS_DIR = "~/.local/share/napari-gpfm/models"
GPFM_NAME = "gpfm"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


class ModelCardWarning(UserWarning):
    """A card in the user models dir is malformed and was skipped."""


def bundled_models_dir() -> Path:
    """The bundled cards: ``napari_gpfm/models`` in a wheel, else ``models/`` at the repo root."""
    candidates = (_PACKAGE_DIR / "models", _PACKAGE_DIR.parent / "models")
    for directory in candidates:
        if directory.is_dir():
            return directory
    raise EncoderError(
        "the bundled model cards are missing: looked in "
        + " and ".join(str(d) for d in candidates)
        + ". Reinstall napari-gpfm."
    )


def user_models_dir() -> Path:
    """``$NAPARI_GPFM_MODELS_DIR`` or ``~/.local/share/napari-gpfm/models`` (may not exist)."""
    value = os.environ.get(MODELS_DIR_ENV, "").strip()
    return Path(value or DEFAULT_USER_MODELS_DIR).expanduser()


def list_cards() -> list[ModelCard]:
    """Every card, sorted by name. A malformed bundled card raises `ModelCardError`; a malformed
    user card is skipped with a `ModelCardWarning` naming the file."""
    cards = _read_dir(bundled_models_dir(), strict=True)
    user_dir = user_models_dir()
    if user_dir.is_dir():
        cards.update(_read_dir(user_dir, strict=False))
    return [cards[name] for name in sorted(cards)]


def get_card(name: str) -> ModelCard:
    """The card called ``name``; an unknown name raises `UnknownModelError` listing known ones."""
    cards = {card.name: card for card in list_cards()}
    if name not in cards:
        raise UnknownModelError(name, sorted(cards))
    return cards[name]


def default_model_name() -> str:
    """``"gpfm"`` when its weights are found; else the best card marked ``bundled_default: true``
    whose weights are found (GPFM-trained ones first, then by name); else raise
    `WeightsNotFoundError` explaining which GPFM file to get and where to put it."""
    cards = {card.name: card for card in list_cards()}
    gpfm = cards.get(GPFM_NAME)
    if gpfm is not None and gpfm.status().found:
        return gpfm.name
    usable = [c for c in cards.values() if c.bundled_default and c.status().found]
    if usable:
        return min(usable, key=lambda c: (not c.is_gpfm, c.name)).name
    help_text = gpfm.missing_weights_message() if gpfm is not None else (
        f"no '{GPFM_NAME}' model card is installed; reinstall napari-gpfm."
    )
    raise WeightsNotFoundError(
        "GPFM weights are missing and no other default model is available.\n" + help_text
    )


#: Parsed cards by file: ((mtime_ns, size), card).
_PARSED: dict[Path, tuple[tuple[int, int], ModelCard]] = {}


def _card_from(path: Path) -> ModelCard:
    """``ModelCard.from_yaml(path)``, parsed again only when the file changed."""
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _PARSED.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    card = ModelCard.from_yaml(path)
    _PARSED[path] = (stamp, card)
    return card


def _read_dir(directory: Path, strict: bool) -> dict[str, ModelCard]:
    """Cards of one directory by name; two files with one name are an error naming both."""
    cards: dict[str, ModelCard] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            card = _card_from(path)
        except ModelCardError as exc:
            if strict:
                raise
            warnings.warn(f"skipping model card: {exc}", ModelCardWarning, stacklevel=3)
            continue
        if card.name in cards:
            raise ModelCardError(
                path, f"name '{card.name}' is already used by {cards[card.name].path}"
            )
        cards[card.name] = card
    return cards
