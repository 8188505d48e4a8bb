"""Whole-slide images: open, read regions and patches, lazy pyramid levels for napari."""

from .errors import (
    DamagedSlideError,
    EmptySlideError,
    MissingMppError,
    MissingMppWarning,
    SlideError,
    SlideMetadataWarning,
    SlideOpenError,
    SlideReadWarning,
    TileReadError,
    UnsupportedSlideError,
)
from .identity import SlideFingerprint, slide_fingerprint
from .open import open_slide, slide_kind
from .slide import LevelArray, Slide, shared_tile_cache

__all__ = [
    "DamagedSlideError",
    "EmptySlideError",
    "LevelArray",
    "MissingMppError",
    "MissingMppWarning",
    "Slide",
    "SlideError",
    "SlideFingerprint",
    "SlideMetadataWarning",
    "SlideOpenError",
    "SlideReadWarning",
    "TileReadError",
    "UnsupportedSlideError",
    "open_slide",
    "shared_tile_cache",
    "slide_fingerprint",
    "slide_kind",
]
