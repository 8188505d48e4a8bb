"""Download a model's weights on request (never implicitly): Hugging Face Hub or a plain URL.

The file is fetched next to its destination as ``<name>.part``, checked against the card's
SHA-256 when known, and only then moved into place, so an interrupted or corrupt download never
looks like valid weights.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import GatedRepoError

from .card import HubFile, ModelCard
from .checkpoint import sha256_file
from .errors import WeightsDownloadError
from .registry import get_card

_URL_TIMEOUT_S = 60


def download_weights(card: ModelCard | str, dest: str | Path | None = None) -> Path:
    """Fetch ``card``'s weights to ``dest`` (default: the card's expected path) and return it.

    An existing file is kept (and checked against a known SHA-256). Failures (offline, gated,
    not found, checksum) raise `WeightsDownloadError` saying what to do.
    """
    card = card if isinstance(card, ModelCard) else get_card(card)
    w = card.weights
    if w.hf_hub is None and not w.url:
        raise WeightsDownloadError(
            f"model '{card.name}' has no download source (weights.hf_hub or weights.url) in its "
            f"card {card.path}; put the weights file in place by hand."
        )
    target = Path(dest).expanduser() if dest is not None else card.expected_path()
    if target is None:
        raise WeightsDownloadError(
            f"model '{card.name}' has no weights.default_path in its card {card.path}; "
            "give a destination."
        )
    if target.is_file():
        _verify(card, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    source = f"{w.hf_hub.page} (file {w.hf_hub.filename})" if w.hf_hub else str(w.url)
    try:
        if w.hf_hub is not None:
            _fetch_hub(w.hf_hub, partial)
        else:
            _fetch_url(str(w.url), partial)
    except Exception as exc:  # network stacks raise many types; all end the same way for users
        partial.unlink(missing_ok=True)
        raise WeightsDownloadError(_failure_message(card, source, target, exc)) from exc
    try:
        _verify(card, partial)
    except WeightsDownloadError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return target


def _fetch_hub(hub: HubFile, partial: Path) -> None:
    with tempfile.TemporaryDirectory(dir=partial.parent) as tmp:
        fetched = hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision, local_dir=tmp)
        shutil.move(fetched, partial)


def _fetch_url(url: str, partial: Path) -> None:
    with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S) as response:
        with open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)


def _verify(card: ModelCard, path: Path) -> None:
    expected = card.weights.sha256
    if expected is None:
        return
    digest = sha256_file(path)
    if digest != expected:
        raise WeightsDownloadError(
            f"{path}: SHA-256 {digest} does not match {expected} recorded for '{card.name}'; "
            "the download is damaged or a different release. Delete it and try again."
        )


def _failure_message(card: ModelCard, source: str, target: Path, exc: Exception) -> str:
    lines = [f"could not download the weights of '{card.name}' from {source}: {exc}"]
    if card.gated or isinstance(exc, GatedRepoError):
        lines.append("Access is gated: request it on the model page, then log in with "
                     "`hf auth login` (or set HF_TOKEN) and try again.")
    else:
        lines.append("Check the network connection (and any proxy), then try again.")
    by_hand = f"Or download it by hand and put it at {target}"
    if card.weights.env:
        by_hand += f", or set {card.weights.env} to its path"
    lines.append(by_hand + ".")
    return "\n".join(lines)
