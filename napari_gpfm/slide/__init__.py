"""Whole-slide images: open, read regions and patches, lazy pyramid levels for napari."""

from .errors import (
    MissingMppError,
    MissingMppWarning,
    SlideError,
    SlideOpenError,
    SlideReadWarning,
    TileReadError,
)
from .identity import SlideFingerprint, slide_fingerprint
from .open import open_slide, slide_kind
from .slide import LevelArray, Slide, shared_tile_cache

__all__ = [
    "LevelArray",
    "MissingMppError",
    "MissingMppWarning",
    "Slide",
    "SlideError",
    "SlideFingerprint",
    "SlideOpenError",
    "SlideReadWarning",
    "TileReadError",
    "open_slide",
    "shared_tile_cache",
    "slide_fingerprint",
    "slide_kind",
]
