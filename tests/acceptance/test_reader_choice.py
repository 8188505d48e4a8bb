"""napari-gpfm as napari's reader for whole-slide files: offered once in the docks, set through
napari's own preference, and used when a file is opened without naming a plugin; a slide opened
by another reader is named, with a way to reopen it.

napari 0.9's ``viewer.open(path)`` defaults to ``plugin="napari"`` (its builtin reader, no
preference consulted); File › Open and drag-and-drop (without Alt) call
``viewer.open(paths, plugin=None)``, which uses the preferred reader of the file's extension, else
the only reader that accepts the file, else raises ``MultipleReaderError`` (the GUI then shows
its reader dialog). The tests open files both ways napari does without a plugin name, and check
that the default ``viewer.open(path)`` still ignores the preference."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from user import PLUGIN, add_dock, click, new_window

PROJECT = "Project (slide list)"


@pytest.fixture
def napari_settings(tmp_path, monkeypatch):
    """napari's settings in this test's folder, never the user's (request it before
    ``make_napari_viewer``, which resets whatever settings are current)."""
    import napari.settings as ns

    settings = ns.NapariSettings(config_path=tmp_path / "napari" / "settings.yaml")
    monkeypatch.setattr(ns, "_SETTINGS", settings)
    return settings


def test_offer_makes_napari_open_slides_with_napari_gpfm(napari_settings, make_napari_viewer,
                                                         qtbot, sample_svs, tmp_path):  # fmt: skip
    from napari.errors import MultipleReaderError

    viewer = new_window(make_napari_viewer)
    # before: napari cannot choose between its builtin reader and ours (the GUI asks)
    with pytest.raises(MultipleReaderError):
        viewer.open(str(sample_svs), plugin=None)
    dock = add_dock(viewer, PROJECT)
    panel = dock.reader_panel
    assert panel.isVisible() and panel.offer_box.isVisible()
    click(qtbot, panel.use_button)

    prefs = napari_settings.plugins.extension2reader
    assert prefs["*.svs"] == PLUGIN and prefs["*.ndpi"] == PLUGIN and prefs["*.mrxs"] == PLUGIN
    assert not any(k.lower().endswith((".tif", ".tiff")) for k in prefs)  # .tif stays napari's
    assert PLUGIN in (tmp_path / "napari" / "settings.yaml").read_text()  # napari saved it
    assert not panel.offer_box.isVisible()  # asked once

    # a script's plain viewer.open(path) is napari's builtin reader whatever the preference
    builtin = viewer.open(str(sample_svs))
    assert builtin and all(la.source.reader_plugin == "napari" for la in builtin)
    assert all(not la.multiscale for la in builtin)
    for la in builtin:
        viewer.layers.remove(la)
    (layer,) = viewer.open(str(sample_svs), plugin=None)  # no plugin named
    assert layer.multiscale and layer.source.reader_plugin == PLUGIN
    assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")
    assert np.allclose(layer.scale, 0.499, atol=1e-3)
    assert dock.session.slide(layer).slide.mpp == pytest.approx(0.499, abs=1e-3)
    # File › Open and drag-and-drop (napari's handler; with no preference it would pop the
    # modal reader dialog and this test would hang)
    viewer.window._qt_viewer._qt_open([str(sample_svs)], stack=False)
    dropped = viewer.layers[-1]
    assert dropped is not layer and dropped.multiscale
    assert dropped.source.reader_plugin == PLUGIN

    # a .tif stays napari's choice: no preference is written, napari still asks (its dialog
    # preselects its own reader), and napari-gpfm's reader declines a plain, untiled TIFF
    from napari_gpfm.layers.reader import napari_get_reader

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(MultipleReaderError):
        viewer.open(str(plain), plugin=None)
    assert napari_get_reader(str(plain)) is None


def test_no_thanks_is_remembered(napari_settings, make_napari_viewer, qtbot, tmp_path):
    from napari_gpfm._qt.reader_choice import ReaderChoicePanel

    viewer = new_window(make_napari_viewer)
    dock = add_dock(viewer, PROJECT)
    click(qtbot, dock.reader_panel.decline_button)
    assert not dock.reader_panel.offer_box.isVisible()
    assert "*.svs" not in napari_settings.plugins.extension2reader
    assert (tmp_path / "napari" / "napari-gpfm-reader-choice.json").is_file()
    again = ReaderChoicePanel(viewer)  # another dock, later: no offer
    assert again.offer_box.isHidden()
    again.deleteLater()


def test_a_slide_opened_by_napari_is_named_and_reopened(napari_settings, make_napari_viewer,
                                                       qtbot, sample_svs):  # fmt: skip
    viewer = new_window(make_napari_viewer)
    layers = viewer.open(str(sample_svs), plugin="napari")  # "OK" in napari's reader dialog
    assert layers and all(not la.multiscale for la in layers)
    dock = add_dock(viewer, PROJECT)
    panel = dock.reader_panel
    assert panel.foreign_box.isVisible()
    text = panel.foreign_label.text()
    assert layers[0].name in text and "napari's builtin reader" in text and "Reopen" in text
    assert not dock.session.slides  # no dock can use it
    click(qtbot, panel.reopen_button)
    assert all(la not in viewer.layers for la in layers)
    (layer,) = list(viewer.layers)
    assert layer.multiscale and layer.source.reader_plugin == PLUGIN
    assert dock.session.slide(layer) is not None
    assert not panel.foreign_box.isVisible()
    assert dock.table.rowCount() == 1  # and the project lists it
