"""Fixtures for the tiles tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiles_helpers import SAMPLE, write_tiff


@pytest.fixture
def sample_path() -> Path:
    assert SAMPLE.exists(), f"sample slide missing: {SAMPLE}"
    return SAMPLE


@pytest.fixture
def white_tiff(tmp_path: Path) -> Path:
    """A blank white 1536x1024 slide at 0.5 µm/px (no tissue at all)."""
    return write_tiff(tmp_path / "blank.tif", np.full((1024, 1536, 3), 255, np.uint8))
