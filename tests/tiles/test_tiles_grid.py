"""Exact-mpp grid arithmetic, presets, overlap and the missing-mpp refusal."""

from __future__ import annotations

import numpy as np
import pytest
from tiles_helpers import FakeSlide

from napari_gpfm.slide import MissingMppError, open_slide
from napari_gpfm.tiles import (
    PRESETS,
    GridSpec,
    TissueParams,
    best_level,
    detect_tissue,
    get_preset,
    magnification_to_mpp,
    make_grid,
)
from napari_gpfm.tiles.tissue import TissueMask


def blank(w: int, h: int, mpp: float | None, **kw) -> FakeSlide:
    return FakeSlide(np.zeros((8, 8, 3), np.uint8), mpp, dims=(w, h), **kw)


def full_tissue(slide: FakeSlide) -> TissueMask:
    w, h = slide.level_dimensions[0]
    ds = 16.0
    mask = np.ones((int(np.ceil(h / ds)), int(np.ceil(w / ds))), bool)
    return TissueMask(mask=mask, downsample=ds, polygons=[], tissue_fraction=1.0,
                      params=TissueParams())


@pytest.mark.parametrize(
    ("slide_mpp", "expected"),
    [(0.25, 448), (0.5, 224), (0.499, 224), (0.2527, 443), (1.0, 112)],
)
def test_patch_size_level0_uses_exact_mpp(slide_mpp, expected):
    grid = make_grid(blank(5000, 5000, slide_mpp), GridSpec(target_mpp=0.5, patch_size=224))
    assert grid.patch_size_level0 == expected
    assert grid.stride_level0 == expected
    assert grid.slide_mpp == slide_mpp


def test_presets_separate_field_from_model_input():
    p20 = get_preset("gpfm-20x-224")
    p40 = get_preset("gpfm-40x-512to224")
    assert (p20.target_mpp, p20.patch_size, p20.out_size()) == (0.5, 224, 224)
    assert (p40.target_mpp, p40.patch_size, p40.out_size()) == (0.25, 512, 224)
    assert p40.field_um == pytest.approx(128.0)
    assert p20.field_um == pytest.approx(112.0)
    # on a 40x scan the 40x preset reads 512 level-0 px and hands 224 px to the model
    grid = make_grid(blank(4096, 4096, 0.25), p40)
    assert grid.patch_size_level0 == 512 and grid.out_size == 224
    # on a 20x scan the same 128 µm field is 256 level-0 px
    assert make_grid(blank(4096, 4096, 0.5), p40).patch_size_level0 == 256
    with pytest.raises(KeyError, match="gpfm-20x-224"):
        get_preset("nope")
    assert set(PRESETS) >= {"gpfm-20x-224", "gpfm-40x-512to224"}


def test_user_settable_size_mpp_overlap_and_magnification():
    spec = PRESETS["gpfm-20x-224"].replace(patch_size=256, overlap=64)
    assert spec.name is None and spec.stride == 192 and spec.input_size == 224
    grid = make_grid(blank(1000, 600, 0.25), spec)
    assert grid.patch_size_level0 == 512 and grid.stride_level0 == 384
    # x positions 0, 384 (768 + 512 > 1000 is left out); y: 0 only
    np.testing.assert_array_equal(grid.coords, [[0, 0], [384, 0]])
    assert magnification_to_mpp(20) == 0.5 and magnification_to_mpp(40) == 0.25
    with pytest.raises(ValueError, match="overlap"):
        GridSpec(patch_size=224, overlap=224)


def test_coords_row_major_inside_slide_and_int64():
    slide = blank(1000, 700, 0.5)
    grid = make_grid(slide, GridSpec(target_mpp=0.5, patch_size=200, min_tissue=0.0))
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (15, 2)
    assert grid.grid_shape == (3, 5)
    xs, ys = grid.coords[:, 0], grid.coords[:, 1]
    assert np.all(np.lexsort((xs, ys)) == np.arange(len(xs))), "not row-major (y, then x)"
    assert xs.max() + 200 <= 1000 and ys.max() + 200 <= 700


def test_min_tissue_filters_patches():
    slide = blank(800, 400, 0.5)
    mask = np.zeros((25, 50), bool)
    mask[:, :20] = True  # tissue in level-0 x < 320
    tm = TissueMask(mask=mask, downsample=16.0, polygons=[], tissue_fraction=0.4,
                    params=TissueParams())
    grid = make_grid(slide, GridSpec(target_mpp=0.5, patch_size=200, min_tissue=0.5), tm)
    # columns at x=0 (100%), 200 (60%) kept, 400 (0%) and 600 dropped
    assert sorted(set(grid.coords[:, 0].tolist())) == [0, 200]
    np.testing.assert_allclose(sorted(set(grid.tissue_fraction.round(3).tolist())), [0.6, 1.0])
    all_kept = make_grid(slide, GridSpec(target_mpp=0.5, patch_size=200, min_tissue=0.0), tm)
    assert len(all_kept) == 8


def test_missing_mpp_refused_with_instructions_and_override_works():
    slide = blank(2000, 2000, None, path="/data/nompp.tif")
    with pytest.raises(MissingMppError) as e:
        make_grid(slide, GridSpec())
    assert "nompp.tif" in str(e.value) and "--mpp" in str(e.value)
    grid = make_grid(slide.with_mpp(0.25), GridSpec())
    assert grid.patch_size_level0 == 448 and grid.mpp_source == "user"


def test_missing_mpp_on_a_real_file(tmp_path):
    from synthetic_slides import write_tiff

    path = write_tiff(tmp_path / "nompp.tif", np.full((600, 600, 3), 200, np.uint8), mpp=None)
    slide = open_slide(path)
    with pytest.raises(MissingMppError, match="nompp.tif"):
        make_grid(slide, GridSpec())
    assert make_grid(open_slide(path, mpp=0.5), GridSpec(min_tissue=0)).patch_size_level0 == 224


def test_read_level_prefers_coarsest_level_not_coarser_than_needed():
    downs = [1.0, 2.000337, 4.002024, 8.016679]
    assert best_level(downs, 1.0) == 0
    assert best_level(downs, 2.0) == 1  # 2.0003 counts as 2
    assert best_level(downs, 3.9) == 1
    assert best_level(downs, 16.0) == 3
    slide = blank(8000, 8000, 0.125, downsamples=tuple(downs))
    grid = make_grid(slide, PRESETS["gpfm-20x-224"])  # 896 level-0 px -> 224: downsample 4
    assert grid.read_level == 2


def test_sample_slide_grid_covers_tissue(sample_path):
    slide = open_slide(sample_path)
    tm = detect_tissue(slide, TissueParams(thumbnail_max_side=512))
    grid = make_grid(slide, PRESETS["gpfm-20x-224"], tm)
    assert 20 < len(grid) < 100
    assert grid.patch_size_level0 == 224  # 224 * 0.5 / 0.499 = 224.4
    assert np.all(grid.tissue_fraction >= 0.5)
    assert np.all(grid.coords % grid.stride_level0 == 0)
