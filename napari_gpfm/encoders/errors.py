"""Errors of the encoders layer. Every message names the file (or model) and the problem."""

from __future__ import annotations

from pathlib import Path

from napari_gpfm.errors import NapariGpfmError


class EncoderError(NapariGpfmError):
    """Base class: a model card, checkpoint or encoder cannot be used."""


class ModelCardError(EncoderError, ValueError):
    """A model card file is malformed: unknown or missing keys, wrong types or values."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        where = str(self.path) if self.path is not None else "model card"
        super().__init__(f"{where}: bad model card: {problem}")


class UnknownModelError(EncoderError, LookupError):
    """No card in the registry has the requested name."""

    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        listing = ", ".join(known) if known else "(none)"
        super().__init__(f"unknown model '{name}'. Known models: {listing}")

    def __str__(self) -> str:  # LookupError would otherwise quote the message
        return self.args[0]


class WeightsNotFoundError(EncoderError, FileNotFoundError):
    """A model's weights file is not on this machine; the message says how to get it."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise prefix an errno
        return self.args[0]


class CheckpointError(EncoderError):
    """A checkpoint file cannot be read or does not fit the model."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint would run code or build arbitrary objects when loaded; refused."""


class LayoutMismatchError(CheckpointError):
    """The checkpoint is not of the layout the model card names (``checkpoint_layout``)."""

    def __init__(self, path: str | Path, expected: str, detected: str, evidence: str,
                 model_name: str | None = None):
        self.expected, self.detected = expected, detected
        card = f"the card of model '{model_name}'" if model_name else "the model card"
        super().__init__(
            path,
            f"{card} says checkpoint_layout: {expected}, but this file holds a '{detected}' "
            f"checkpoint ({evidence}). Use the weights file made for this model, or a card "
            f"with checkpoint_layout: {detected}.",
        )


class StateDictMismatchError(CheckpointError):
    """After conversion the checkpoint's keys or shapes do not match the model (strict load)."""

    def __init__(
        self,
        path: str | Path,
        model_name: str,
        missing: list[str],
        unexpected: list[str],
        wrong_shapes: list[str],
        layout: str,
    ):
        self.model_name = model_name
        self.missing, self.unexpected, self.wrong_shapes = missing, unexpected, wrong_shapes
        parts = [
            f"the weights do not fit model '{model_name}' (converted as checkpoint layout "
            f"'{layout}')."
        ]
        for title, keys in (
            ("missing keys (in the model, not in the file)", missing),
            ("unexpected keys (in the file, not in the model)", unexpected),
            ("wrong shapes", wrong_shapes),
        ):
            if keys:
                parts.append(_key_listing(title, keys))
        parts.append("Is this the right file for this model card?")
        super().__init__(path, "\n".join(parts))


class WeightsDownloadError(EncoderError):
    """Downloading a model's weights failed (offline, gated, checksum mismatch...)."""


def _key_listing(title: str, keys: list[str], limit: int = 20) -> str:
    """``title (n): k1, k2, ... (and m more)`` with at most ``limit`` keys shown."""
    shown = ", ".join(keys[:limit])
    more = f" ... (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}): {shown}{more}"
