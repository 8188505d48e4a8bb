"""The acceptance suite drives napari-gpfm only the way a user can: slides opened with
``viewer.open``, every dock added with ``viewer.window.add_plugin_dock_widget`` (so each dock
gets napari's proxy of the viewer, as from the Plugins menu), clicks on visible buttons, and
shapes and clicks made with real Qt mouse events on the canvas."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "_qt"))

from gpfm_helpers import write_tiny_card  # noqa: E402

@pytest.fixture(autouse=True)
def user_env(tmp_path_factory, tmp_path, monkeypatch):
    """A tiny random ViT in the user's models folder and a fresh features folder."""
    d = write_tiny_card(tmp_path_factory.getbasetemp() / "acceptance-models")
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
    monkeypatch.setenv("NAPARI_GPFM_FEATURES_DIR", str(tmp_path / "features"))
    return tmp_path / "features"


