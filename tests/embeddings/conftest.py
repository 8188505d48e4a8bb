"""Fixtures for the embeddings tests: a tiny random encoder and slides."""

from __future__ import annotations

from pathlib import Path

import pytest
from embed_helpers import SAMPLE, TINY, write_card_dir
from synthetic_slides import write_tiff


@pytest.fixture(autouse=True)
def tiny_models_dir(tmp_path_factory, monkeypatch) -> Path:
    """Point the model registry at a folder holding the tiny test card."""
    d = write_card_dir(tmp_path_factory.getbasetemp() / "models")
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return d


@pytest.fixture
def encoder(tiny_models_dir):
    from napari_gpfm.encoders import load_encoder

    return load_encoder(TINY, allow_random=True)


@pytest.fixture
def nompp_tiff(tmp_path: Path) -> Path:
    """A slide without mpp: the left third of the sample slide, no resolution tags."""
    from napari_gpfm.slide import open_slide

    s = open_slide(SAMPLE)
    rgb = s.read_region(600, 1000, 0, 1200, 1200)
    return write_tiff(tmp_path / "nompp.tif", rgb, mpp=None)
