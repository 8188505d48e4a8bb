"""Issue 16 (3): a grid of an absurd number of patches asks for confirmation instead of starting
millions of one-pixel patches, and is refused before its layout is allocated."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from tiles_helpers import FakeSlide

from napari_gpfm.errors import NapariGpfmError
from napari_gpfm.tiles import GridSpec, TissueMask, make_grid
from napari_gpfm.tiles.grid import DEFAULT_MAX_PATCHES, TooManyPatchesError


def _slide(side: int, mpp: float, source: str = "file") -> FakeSlide:
    s = FakeSlide(np.zeros((8, 8, 3), np.uint8), mpp, source, path="huge.svs", dims=(side, side))
    return s


def test_an_absurd_grid_asks_for_confirmation_at_once():
    """100k² px at 20 µm/px (the top of the plausible range): 224 px at 0.5 µm/px is 6 level-0
    px, 277 million positions: refused before the layout is allocated (its coordinates alone
    would take 4.4 GB; how fast the refusal comes is bench material, not asserted here)."""
    slide = _slide(100_000, 20.0)
    tracemalloc.start()
    try:
        with pytest.raises(TooManyPatchesError) as info:
            make_grid(slide, GridSpec(target_mpp=0.5, patch_size=224, min_tissue=0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated before the refusal"
    message = str(info.value)
    assert message.startswith(f"{Path('huge.svs')}: the patch grid would hold 277,755,556 patches")
    assert f"limit of {DEFAULT_MAX_PATCHES:,}" in message and "6 level-0 px" in message
    assert "20 µm/px recorded in the file" in message
    assert "--max-patches N" in message and "max_patches=None" in message
    assert isinstance(info.value, NapariGpfmError)  # the CLI's "error: ..." line, exit 2
    # nothing breaks afterwards: a sane grid of the same slide at its real pixel size
    grid = make_grid(slide.with_mpp(0.25), GridSpec(target_mpp=0.5, patch_size=224, min_tissue=0))
    assert len(grid) == 223 * 223 and grid.grid_shape == (223, 223)


def test_the_limit_counts_patches_kept_after_tissue_filtering():
    """Candidates over the limit are fine when the tissue keeps fewer; evaluated block by block,
    and refused as soon as the kept count passes the limit."""
    slide = _slide(20_000, 0.5)
    spec = GridSpec(target_mpp=0.5, patch_size=10, min_tissue=0.5)  # 2000 x 2000 positions
    mask = np.zeros((200, 200), bool)
    mask[:20, :] = True  # the top tenth of the slide is tissue
    tissue = TissueMask(mask, downsample=100.0)
    grid = make_grid(slide, spec, tissue, max_patches=500_000)
    assert len(grid) == 200 * 2000 and grid.grid_shape == (2000, 2000)
    assert (grid.coords[:, 1] < 2000).all() and np.all(np.diff(grid.coords[:, 1]) >= 0)
    mask[:] = True
    with pytest.raises(TooManyPatchesError, match=r"huge\.svs: the patch grid would hold more "
                                                  r"than 500,000 patches"):  # fmt: skip
        make_grid(slide, spec, TissueMask(mask, downsample=100.0), max_patches=500_000)


def test_confirming_lifts_the_limit():
    slide = _slide(2_000, 0.5, "user")
    spec = GridSpec(target_mpp=0.5, patch_size=100, min_tissue=0)  # 20 x 20
    with pytest.raises(TooManyPatchesError, match=r"400 patches.*limit of 399.*given by you"):
        make_grid(slide, spec, max_patches=399)
    assert len(make_grid(slide, spec, max_patches=400)) == 400  # the limit itself is allowed
    assert len(make_grid(slide, spec, max_patches=None)) == 400
    assert len(make_grid(slide, spec, max_patches=0)) == 400  # 0: no limit (the CLI's)
