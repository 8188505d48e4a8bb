"""Tissue detection: finds tissue where there is some, nothing on blank glass."""

from __future__ import annotations

import numpy as np
import pytest
from tiles_helpers import FakeSlide

from napari_gpfm.slide import open_slide
from napari_gpfm.tiles import TissueParams, detect_tissue
from napari_gpfm.tiles.tissue import TissueMask


def test_sample_slide_has_tissue_with_polygons_in_level0(sample_path):
    slide = open_slide(sample_path)
    tm = detect_tissue(slide, TissueParams(thumbnail_max_side=512))
    assert not tm.is_empty
    # The sample is a strip of skin on glass: clearly some tissue, clearly not all of it.
    assert 0.15 < tm.tissue_fraction < 0.7
    assert tm.polygons, "tissue found but no polygon traced"
    w0, h0 = slide.level_dimensions[0]
    for poly in tm.polygons:
        ext = poly.exterior
        assert ext.shape[1] == 2
        assert ext[:, 0].min() >= -1 and ext[:, 0].max() <= w0 + 1
        assert ext[:, 1].min() >= -1 and ext[:, 1].max() <= h0 + 1
    # Polygons are in level-0 pixels, not thumbnail pixels.
    assert max(p.exterior[:, 1].max() for p in tm.polygons) > 0.8 * h0


def test_blank_white_slide_has_no_tissue(white_tiff):
    tm = detect_tissue(open_slide(white_tiff))
    assert tm.is_empty
    assert tm.tissue_fraction == 0.0
    assert tm.polygons == []


def test_faint_noise_is_not_tissue():
    """JPEG-like grey noise on glass must stay below the saturation floor."""
    rng = np.random.default_rng(0)
    img = np.clip(235 + rng.normal(0, 3, (400, 400, 3)), 0, 255).astype(np.uint8)
    tm = detect_tissue(FakeSlide(img, 0.5), TissueParams(thumbnail_max_side=400))
    assert tm.is_empty


def test_square_of_tissue_detected_and_hole_kept():
    img = np.full((400, 400, 3), 240, np.uint8)
    img[100:300, 100:300] = (180, 60, 140)  # stained square
    img[170:230, 170:230] = 240  # a hole in it
    slide = FakeSlide(img, mpp=1.0)
    # mask_mpp=None: a full-resolution mask, so that mask pixels are level-0 pixels here
    tm = detect_tissue(slide, TissueParams(thumbnail_max_side=400, close_radius=0, open_radius=0,
                                           min_area_um2=None, max_hole_area_um2=100.0,
                                           mask_mpp=None))
    assert tm.mask[150, 150] and not tm.mask[200, 200] and not tm.mask[50, 50]
    (poly,) = tm.polygons
    assert len(poly.holes) == 1
    # exterior along pixel edges: x from 100 to 300 level-0 px
    assert poly.exterior[:, 0].min() == pytest.approx(100, abs=1)
    assert poly.exterior[:, 0].max() == pytest.approx(300, abs=1)
    # the same hole is filled when holes of that size are allowed to be filled
    filled = detect_tissue(slide, TissueParams(thumbnail_max_side=400, close_radius=0,
                                               open_radius=0, max_hole_area_um2=None,
                                               mask_mpp=None))
    assert filled.mask[200, 200] and filled.polygons[0].holes == []


def test_small_specks_dropped_by_min_area():
    img = np.full((400, 400, 3), 240, np.uint8)
    img[10:14, 10:14] = (180, 60, 140)  # 16 µm² speck at 1 µm/px
    img[200:300, 200:300] = (180, 60, 140)
    tm = detect_tissue(FakeSlide(img, 1.0), TissueParams(thumbnail_max_side=400, min_area_um2=500,
                                                         mask_mpp=None))
    assert not tm.mask[12, 12] and tm.mask[250, 250]


def test_fraction_grid_is_area_exact():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half tissue
    tm = TissueMask(mask=mask, downsample=4.0, polygons=[], tissue_fraction=0.5,
                    params=TissueParams())
    # level-0 squares of side 8 (2 mask px)
    xs = np.array([0, 12, 16, 20, 36])
    frac = tm.fraction_grid(xs, [0], 8)
    assert frac.shape == (1, 5)
    np.testing.assert_allclose(frac[0], [1.0, 1.0, 0.5, 0.0, 0.0])
    # sub-pixel borders: [18, 26) covers 2 px of tissue (18..20) out of 8
    assert tm.fraction_grid([18], [0], 8)[0, 0] == pytest.approx(0.25)
    # partly outside the slide counts as background
    assert tm.fraction_grid([-4], [0], 8)[0, 0] == pytest.approx(0.5)
    assert tm.fraction_grid([0], [36], 8)[0, 0] == pytest.approx(0.5)


def test_params_validation_names_the_field():
    with pytest.raises(ValueError, match="method"):
        TissueParams(method="magic")
    with pytest.raises(ValueError, match="min_saturation"):
        TissueParams(min_saturation=2.0)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "fine"):
        with pytest.raises(ValueError, match="mask_mpp"):
            TissueParams(mask_mpp=bad)
