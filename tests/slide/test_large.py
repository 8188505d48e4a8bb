"""Opening does not depend on slide size: a 100,000 x 100,000 pyramid opens without decoding."""

from __future__ import annotations

import psutil

from napari_gpfm.slide import open_slide
from napari_gpfm.slide.cache import TileCache


def test_large_pyramid_opens_lazily(large_pyramid):
    rss = psutil.Process().memory_info().rss
    slide = open_slide(large_pyramid)
    grown = psutil.Process().memory_info().rss - rss
    assert slide.dimensions == (100_000, 100_000)
    assert slide.level_count == 7 and slide.has_native_pyramid
    assert grown < 200 * 2**20
    slide._cache = TileCache()
    calls = []
    original = slide.backend.read_tile
    slide.backend.read_tile = lambda *a: calls.append(a) or original(*a)
    levels = slide.levels
    assert levels[0].shape == (100_000, 100_000, 3)
    assert calls == []  # nothing decoded until pixels are asked for
    block = levels[0][50_000:50_300, 70_000:70_300]
    assert block.shape == (300, 300, 3) and len(calls) <= 4
