"""Shared pieces of the GPFM dock tests: a tiny random ViT card and the sample slide layer."""

from __future__ import annotations

from pathlib import Path
from tiny_models import tiny_card

TINY = "tiny-qt"
TINY_CARD = tiny_card(TINY, 112, "Tiny random ViT for the dock tests")


def write_tiny_card(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{TINY}.yaml").write_text(TINY_CARD)
    return directory


def add_slide(viewer, path, mpp=None):
    """A slide layer as napari-gpfm's reader makes it (``mpp`` overrides the file's)."""
    from napari_gpfm.layers.reader import slide_layer_data
    from napari_gpfm.slide import open_slide

    data, kwargs, _ = slide_layer_data(open_slide(path, mpp=mpp))
    return viewer.add_image(data, **kwargs)


def use_tiny_model(w, out_dir: Path, patch_size: int = 112, batch_size: int = 16):
    """Set a GPFM dock to the tiny model, custom ``patch_size`` px patches at 0.5 µm/px and
    output in ``out_dir`` (confirmed, as with Enter in the folder field); returns the dock."""
    w.set_model(TINY)
    w.preset_combo.setCurrentText("custom")
    w.mpp_spin.setValue(0.5)
    w.size_spin.setValue(patch_size)
    w.out_edit.setText(str(out_dir))
    w.out_edit.editingFinished.emit()
    w.batch_size = batch_size
    return w


def make_widget(viewer, out_dir: Path, patch_size: int = 112, batch_size: int = 16):
    """The dock built directly on ``viewer`` with random weights allowed, on the tiny model
    (:func:`use_tiny_model`)."""
    from napari_gpfm._qt.gpfm_widget import GPFMWidget

    return use_tiny_model(GPFMWidget(viewer, allow_random=True), out_dir, patch_size, batch_size)
