"""Slides opened the way a user does: through napari's plugin path."""

from __future__ import annotations

import numpy as np
import pytest

from napari_gpfm.layers.reader import layer_slide, napari_get_reader
from napari_gpfm.slide import MissingMppWarning

PLUGIN = "napari-gpfm"


def _units(layer) -> list[str]:
    return [str(u) for u in layer.units]


@pytest.mark.parametrize(
    "fixture, n_levels, vendor",
    [("sample_svs", 1, "aperio"), ("pyramid_tif", 3, "generic-tiff"), ("ome_tiff", 3, None), ("dicom_dir", 1, "dicom")],
)
def test_formats_open_as_one_multiscale_layer_in_micrometres(make_napari_viewer, request, fixture, n_levels, vendor):
    path = request.getfixturevalue(fixture)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert len(layers) == 1 and len(viewer.layers) == 1
    layer = layers[0]
    assert layer.rgb and layer.multiscale
    assert len(layer.data) == n_levels
    assert layer.data[0].shape == (2967, 2220, 3)
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499), abs=1e-4)
    assert _units(layer) == ["micrometer", "micrometer"]
    meta = layer.metadata["napari_gpfm"]
    assert meta["mpp"] == pytest.approx(0.499, abs=1e-4)
    assert meta["level_dimensions"][0] == (2220, 2967)
    if vendor:
        assert meta["vendor"] == vendor
    # the world extent in µm is the slide's physical size
    extent = layer.extent.world[1] - layer.extent.world[0]
    assert extent == pytest.approx((2967 * 0.499, 2220 * 0.499), rel=1e-3)


def test_missing_mpp_opens_in_pixels_with_a_visible_warning(make_napari_viewer, nompp_tif):
    viewer = make_napari_viewer()
    with pytest.warns(MissingMppWarning, match="Slide info"):
        (layer,) = viewer.open(str(nompp_tif), plugin=PLUGIN)
    assert tuple(layer.scale) == (1.0, 1.0)
    assert _units(layer) == ["pixel", "pixel"]
    assert layer.metadata["napari_gpfm"]["mpp"] is None


@pytest.mark.parametrize("kind, words", [("empty", "empty"), ("truncated", "truncated"), ("random", "TIFF header")])
def test_bad_files_leave_the_viewer_working(make_napari_viewer, bad_inputs, sample_svs, kind, words):
    viewer = make_napari_viewer()
    with pytest.raises(Exception) as info:
        viewer.open(str(bad_inputs[kind]), plugin=PLUGIN)
    text = str(info.value) + str(info.value.__cause__)
    assert bad_inputs[kind].name in text and words in text
    assert len(viewer.layers) == 0
    viewer.open(str(sample_svs), plugin=PLUGIN)  # still works
    assert len(viewer.layers) == 1


def test_corrupt_tile_is_reported_while_browsing(make_napari_viewer, corrupt_tile_tif):
    from napari_gpfm.slide import SlideReadWarning

    path, tx, ty = corrupt_tile_tif
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    with pytest.warns(SlideReadWarning, match=f"column {tx}, row {ty}"):
        block = layer.data[0][0:600, 0:800]
    assert block.shape == (600, 800, 3)
    assert len(viewer.layers) == 1


def test_plain_images_are_left_to_napari(tmp_path):
    import tifffile
    from PIL import Image

    png, jpg, small = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.tif"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(png)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(jpg)
    tifffile.imwrite(small, np.zeros((64, 64, 3), np.uint8))
    for path in (png, jpg, small):
        assert napari_get_reader(str(path)) is None
    assert napari_get_reader(str(tmp_path / "x.svs")) is not None


def test_sample_data_contribution(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cmu-1-small-region")
    (layer,) = viewer.layers
    assert layer.name == "CMU-1-Small-Region"
    assert layer_slide(layer).mpp == pytest.approx(0.499)


def test_large_pyramid_opens_lazily_in_the_viewer(make_napari_viewer, large_pyramid):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(large_pyramid), plugin=PLUGIN)
    assert layer.data[0].shape == (100_000, 100_000, 3)
    assert len(layer.data) == 7
    slide = layer_slide(layer)
    # the whole-slide view draws from the smallest level only
    assert layer.data_level == len(layer.data) - 1
    assert slide.level_dimensions[-1][0] < 2000
