"""The truncation check at open follows the TIFF's next-page pointers itself (tifffile does not
keep its pages): it must find the last page of a many-page file, as tifffile would."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import tifffile

from napari_gpfm.slide import TruncatedSlideWarning, open_slide


def _pages(path, n=4):
    rng = np.random.default_rng(1)
    with tifffile.TiffWriter(path) as tw:
        for i in range(n):
            side = 512 >> i
            tw.write(rng.integers(0, 255, (side, side, 3), np.uint8), tile=(128, 128),
                     photometric="rgb", compression="zlib", resolutionunit="CENTIMETER",
                     resolution=(2e4, 2e4))  # fmt: skip
    return path


def test_the_last_of_many_pages_pointing_past_the_end_is_warned(tmp_path):
    path = _pages(tmp_path / "four.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_slide(path).close()  # intact: no word
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 4 and not tif.is_bigtiff
        last = int(tif.pages[3].offset)
        bo = tif.byteorder
    data = bytearray(path.read_bytes())
    (count,) = struct.unpack(f"{bo}H", data[last : last + 2])
    where = last + 2 + 12 * count
    struct.pack_into(f"{bo}I", data, where, len(data) + 10_000)  # the next page: past the end
    path.write_bytes(bytes(data))
    with pytest.warns(TruncatedSlideWarning, match="page 3 points to a next page"):
        slide = open_slide(path)
    assert slide.level_count >= 1
    slide.close()
