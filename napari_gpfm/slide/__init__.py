"""Whole-slide images: open, read regions and patches, lazy pyramid levels for napari."""

from .errors import (
    DamagedSlideError,
    EmptySlideError,
    ImplausibleMppError,
    ImplausibleMppWarning,
    MissingMppError,
    MissingMppWarning,
    SlideError,
    SlideMetadataWarning,
    SlideOpenError,
    SlideReadWarning,
    TileReadError,
    TruncatedSlideWarning,
    UnsupportedSlideError,
)
from .identity import SlideFingerprint, slide_fingerprint
from .mpp import MPP_RANGE, mpp_problem, validate_mpp
from .open import open_slide, slide_kind
from .slide import LevelArray, Slide, shared_tile_cache

__all__ = [
    "DamagedSlideError",
    "EmptySlideError",
    "ImplausibleMppError",
    "ImplausibleMppWarning",
    "MPP_RANGE",
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
    "TruncatedSlideWarning",
    "UnsupportedSlideError",
    "mpp_problem",
    "open_slide",
    "shared_tile_cache",
    "slide_fingerprint",
    "slide_kind",
    "validate_mpp",
]
