"""The 'Slide info' dock: metadata, associated images, and the mpp override."""

from __future__ import annotations

import pytest

from napari_gpfm._qt.slide_info import SlideInfoWidget
from napari_gpfm.layers.reader import layer_slide


def test_shows_metadata_and_associated_images(make_napari_viewer, sample_svs):
    viewer = make_napari_viewer()
    viewer.open(str(sample_svs), plugin="napari-gpfm")
    widget = SlideInfoWidget(viewer)
    assert widget.layer_combo.currentText() == "CMU-1-Small-Region"
    assert "0.4990" in widget.fields["mpp"].text() and "from the file" in widget.fields["mpp"].text()
    assert widget.fields["objective"].text() == "20×"
    names = [widget.assoc_combo.itemText(i) for i in range(widget.assoc_combo.count())]
    assert set(names) == {"thumbnail", "label", "macro"}
    widget.assoc_combo.setCurrentText("label")
    assert not widget.assoc_preview.pixmap().isNull()
    widget.filter_edit.setText("appmag")
    rows = {widget.props.item(r, 0).text(): widget.props.item(r, 1).text() for r in range(widget.props.rowCount())}
    assert rows["aperio.AppMag"] == "20"
    assert "aperio.Date" not in rows and all("appmag" in (k + v).lower() for k, v in rows.items())


def test_mpp_override_puts_a_pixel_slide_into_micrometres(make_napari_viewer, nompp_tif):
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning):
        (layer,) = viewer.open(str(nompp_tif), plugin="napari-gpfm")
    widget = SlideInfoWidget(viewer)
    assert "does not record its pixel size" in widget.mpp_warning.text()
    widget.mpp_spin.setValue(0.25)
    widget.mpp_button.click()
    assert tuple(layer.scale) == (0.25, 0.25)
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert layer_slide(layer).mpp == 0.25 and layer_slide(layer).mpp_source == "user"
    assert "set by you" in widget.fields["mpp"].text()
    assert widget.mpp_warning.text() == ""


def test_follows_layers_added_and_removed(make_napari_viewer, sample_svs, pyramid_tif):
    viewer = make_napari_viewer()
    widget = SlideInfoWidget(viewer)
    assert widget.layer_combo.count() == 0
    viewer.open(str(sample_svs), plugin="napari-gpfm")
    viewer.open(str(pyramid_tif), plugin="napari-gpfm")
    assert widget.layer_combo.count() == 2
    viewer.layers.remove("pyramid")
    assert widget.layer_combo.count() == 1
