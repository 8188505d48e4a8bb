"""Slide identity, no tissue and recipe changes, as a user meets them in the GPFM dock."""

from __future__ import annotations

import shutil

import numpy as np
from user import click, compute, gpfm_dock, new_window, open_slide, snap, write_white_slide

from napari_gpfm.layers.session import result_name


def test_slides_sharing_a_stem_get_their_own_stores(make_napari_viewer, qtbot, sample_svs,
                                                     pyramid_tif, tmp_path):  # fmt: skip
    """``X.svs`` and a different ``X.mirrored.tif``: two layers, two stores, two cluster maps."""
    a_path = tmp_path / "X.svs"
    shutil.copy(sample_svs, a_path)
    b_path = tmp_path / "X.mirrored.tif"
    shutil.copy(pyramid_tif, b_path)
    viewer = new_window(make_napari_viewer)
    a, b = open_slide(viewer, a_path), open_slide(viewer, b_path)
    assert (a.name, b.name) == ("X", "X.mirrored")
    dock = gpfm_dock(viewer, qtbot)
    stores = {}
    for layer in (a, b):
        dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(layer.name))
        compute(qtbot, dock)
        stores[layer.name] = dock.session.slide(layer.name).store.path
    assert stores["X"] != stores["X.mirrored"]
    assert stores["X"].name == "X.h5" and stores["X.mirrored"].name == "X.mirrored.h5"
    # a third, different file also named X.svs in another folder is refused, naming both
    other = tmp_path / "elsewhere" / "X.svs"
    other.parent.mkdir()
    shutil.copy(b_path, other)
    c = open_slide(viewer, other)
    dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(c.name))
    compute(qtbot, dock, expect="error")
    text = dock.status.text()
    assert str(a_path) in text and str(other) in text, text
    assert dock.compute_button.isEnabled()
    assert not dock.session.slide(c).has_store  # nothing was mixed in
    snap(viewer, "same_name_other_file")


def test_no_tissue_is_reported_and_the_dock_stays_usable(make_napari_viewer, qtbot, tmp_path,
                                                         sample_svs):  # fmt: skip
    viewer = new_window(make_napari_viewer)
    white = open_slide(viewer, write_white_slide(tmp_path / "blank.tif"))
    dock = gpfm_dock(viewer, qtbot)
    compute(qtbot, dock, expect="error")
    assert "no tissue" in dock.status.text().lower() and "blank.tif" in dock.status.text()
    assert dock.compute_button.isEnabled() and dock.preview_button.isEnabled()
    assert not dock.cancel_button.isEnabled()
    snap(viewer, "no_tissue")
    # Preview says the same, and another slide still embeds
    with qtbot.waitSignal(dock.jobs.finished, timeout=30_000) as blocker:
        click(qtbot, dock.preview_button)
    assert blocker.args == ["error"] and "no tissue" in dock.status.text().lower()
    assert result_name(white.name, "patches") not in viewer.layers
    other = open_slide(viewer, sample_svs)
    dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(other.name))
    compute(qtbot, dock)
    assert dock.session.slide(other).has_store


def test_a_recipe_change_makes_a_new_store_and_drops_the_stale_preview(
    make_napari_viewer, qtbot, sample_svs
):
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    dock = gpfm_dock(viewer, qtbot)
    with qtbot.waitSignal(dock.jobs.finished, timeout=30_000):
        click(qtbot, dock.preview_button)
    grid_name = result_name(layer.name, "patches")
    assert grid_name in viewer.layers
    compute(qtbot, dock)
    first = dock.session.slide(layer).store
    assert grid_name not in viewer.layers  # the preview goes once results are there
    with qtbot.waitSignal(dock.jobs.finished, timeout=30_000):
        click(qtbot, dock.preview_button)
    assert grid_name in viewer.layers
    dock.size_spin.setValue(96)  # the user types another patch size
    assert grid_name not in viewer.layers and "changed" in dock.status.text()
    compute(qtbot, dock)
    second = dock.session.slide(layer).store
    assert second.path != first.path and first.path.exists() and second.path.exists()
    assert second.patch_size_level0 < first.patch_size_level0
    # the old recipe loads again, without a model, from its own file
    dock.size_spin.setValue(112)
    status = compute(qtbot, dock)
    assert "loaded" in status and dock.session.slide(layer).store.path == first.path
    np.testing.assert_array_equal(dock.session.slide(layer).coords, np.asarray(first.coords))


def test_a_store_with_other_settings_is_replaced_only_after_asking(make_napari_viewer, qtbot,
                                                                    sample_svs, monkeypatch):
    """Same model and tiling, other weights (e.g. a replaced weights file): the dock asks;
    "No" keeps the old file, "Yes" replaces it."""
    import napari_gpfm.jobs.embed as embed_job

    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    dock = gpfm_dock(viewer, qtbot)
    compute(qtbot, dock)
    path = dock.session.slide(layer).store.path
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(embed_job, "weights_digest", lambda *a, **k: "another-weights-file")
    asked: list[str] = []
    monkeypatch.setattr(dock, "confirm_overwrite", lambda q: asked.append(q) or False)
    compute(qtbot, dock, expect="error")
    assert len(asked) == 1 and "weights" in asked[0] and str(path) in asked[0]
    assert path.stat().st_mtime_ns == before and "Kept it" in dock.status.text()
    monkeypatch.setattr(dock, "confirm_overwrite", lambda q: asked.append(q) or True)
    with qtbot.waitSignal(dock.jobs.finished, timeout=60_000):  # the refused run
        click(qtbot, dock.compute_button)
    qtbot.waitUntil(lambda: dock.jobs.outcome == "done" and not dock.jobs.busy, timeout=60_000)
    assert len(asked) == 2 and path.stat().st_mtime_ns != before


def test_whole_image_tissue_choice_embeds_every_patch(make_napari_viewer, qtbot, tmp_path):
    """A crop that tissue detection cannot judge: "Whole image" embeds every patch."""
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, write_white_slide(tmp_path / "crop.tif", size=1024))
    dock = gpfm_dock(viewer, qtbot)
    dock.tissue_combo.setCurrentIndex(dock.tissue_combo.findData("none"))
    with qtbot.waitSignal(dock.jobs.finished, timeout=30_000):
        click(qtbot, dock.preview_button)
    assert "whole image" in dock.status.text().lower()
    compute(qtbot, dock)
    state = dock.session.slide(layer)
    per_side = 1024 // state.patch_size_level0
    assert state.n == per_side * per_side
