"""Bad files get a message naming the file and the problem; nothing half-made is returned."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_gpfm.slide import SlideOpenError, SlideReadWarning, TileReadError, open_slide


@pytest.mark.parametrize(
    "kind, words",
    [("empty", "empty"), ("truncated", "truncated"), ("random", "not a readable")],
)
def test_bad_files_are_refused_clearly(bad_inputs, kind, words):
    path = bad_inputs[kind]
    with pytest.raises(SlideOpenError) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message
    assert words in message


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(SlideOpenError, match="not a whole-slide image format"):
        open_slide(other)


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
