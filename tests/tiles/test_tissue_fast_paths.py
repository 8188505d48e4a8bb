"""The fast paths of tissue detection give the same pixels as the plain ones, and the mask
resolution follows ``TissueParams.mask_mpp``.

The speed itself is measured in ``bench/bench_tissue.py`` (never asserted here)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from tiles_helpers import SAMPLE, SAMPLE_MPP, SAMPLE_PYRAMID, FakeSlide, sample_hand_mask, tma_image

from napari_gpfm.slide import open_slide
from napari_gpfm.tiles import GridSpec, TissueParams, detect_tissue, make_grid
from napari_gpfm.tiles.tissue import (
    DEFAULT_MASK_MPP,
    TissueMask,
    _auto_rule,
    _auto_rule_uint8,
    _closing,
    _disk,
    _max_and_saturation,
    _opening,
)


def _random_masks():
    rng = np.random.default_rng(7)
    shapes = [(1, 1), (1, 9), (9, 1), (2, 3), (5, 5), (37, 53), (64, 48)]
    for shape in shapes:
        for p in (0.2, 0.5, 0.8):
            yield rng.random(shape) < p
    blobs = ndi.gaussian_filter(rng.random((96, 80)), 2) > 0.5  # tissue-like blobs
    yield blobs


def test_disk_is_skimage_disk():
    from skimage.morphology import disk

    for r in range(0, 7):
        np.testing.assert_array_equal(_disk(r), disk(r).astype(bool), err_msg=f"radius {r}")


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_closing_and_opening_match_scipy(radius):
    """Radii 1 and 2 are cross steps with shifted boolean operations; they must give exactly
    scipy's pixels with ``disk(r)`` (its default border handling), on every shape."""
    se = _disk(radius)
    for m in _random_masks():
        np.testing.assert_array_equal(_closing(m, radius), ndi.binary_closing(m, structure=se),
                                      err_msg=f"closing r={radius} shape={m.shape}")  # fmt: skip
        np.testing.assert_array_equal(_opening(m, radius), ndi.binary_opening(m, structure=se),
                                      err_msg=f"opening r={radius} shape={m.shape}")  # fmt: skip


def _images():
    rng = np.random.default_rng(3)
    yield rng.integers(0, 256, (61, 47, 3), dtype=np.uint8)  # every kind of pixel
    rgb, _ = tma_image()
    yield rgb  # bimodal: glass and tissue
    yield tma_image(cast=(1.0, 0.995, 0.93))[0]  # tinted glass
    yield rgb[300:700, 300:700]  # mostly tissue: the absolute rule
    yield np.full((20, 20, 3), 240, np.uint8)  # uniform


def test_table_pixel_rule_is_the_float_rule_bit_for_bit():
    params = TissueParams()
    for rgb in _images():
        value, sat = _max_and_saturation(rgb)
        raw, thr, rule, reason = _auto_rule(sat, value, params)
        raw2, thr2, rule2, reason2 = _auto_rule_uint8(rgb, params)
        assert (thr2, rule2, reason2) == (thr, rule, reason)
        np.testing.assert_array_equal(raw2, raw)


@pytest.mark.parametrize("row_loop", [False, True], ids=["cumsum", "row-loop"])
def test_integral_is_exact(monkeypatch, row_loop):
    import napari_gpfm.tiles.tissue as tissue_mod

    if row_loop:  # the path of masks with a million pixels or more
        monkeypatch.setattr(tissue_mod, "_ROW_LOOP_PIXELS", 1)
    rng = np.random.default_rng(5)
    mask = rng.random((123, 77)) < 0.4
    tm = TissueMask(mask=mask, downsample=3.0)
    ref = np.zeros((124, 78))
    ref[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    np.testing.assert_array_equal(tm.integral(), ref)


def _exact_fractions(mask: np.ndarray, ds: float, xs, ys, size0: float) -> np.ndarray:
    """Reference: the area of each square inside each mask pixel (overlap lengths per axis),
    summed over tissue pixels, independent of any summed-area table."""

    def overlaps(starts, n):
        edges = np.arange(n + 1) * ds
        a = np.asarray(starts, float)[:, None]
        return np.clip(np.minimum(a + size0, edges[1:]) - np.maximum(a, edges[:-1]), 0, None)

    wy, wx = overlaps(ys, mask.shape[0]), overlaps(xs, mask.shape[1])
    return wy @ mask.astype(float) @ wx.T / size0**2


# ------------------------------------------------------------------ mask resolution
def test_auto_mask_is_no_finer_than_mask_mpp():
    slide = open_slide(SAMPLE)
    tm = detect_tissue(slide)
    assert tm.params.mask_mpp == DEFAULT_MASK_MPP
    um_per_px = tm.downsample * SAMPLE_MPP
    # (the short side's rounding to whole thumbnail pixels moves it by less than 0.5 %)
    assert DEFAULT_MASK_MPP * 0.995 <= um_per_px < DEFAULT_MASK_MPP * 1.05
    # None: the thumbnail alone sets it (2048 px on the long side, as before the field)
    old = detect_tissue(slide, TissueParams(mask_mpp=None))
    assert max(old.mask.shape) == 2048
    # the legacy methods keep their masks bit for bit (no mask_mpp unless asked for)
    assert TissueParams(method="otsu").mask_mpp is None
    assert TissueParams(method="fixed").mask_mpp is None


def test_a_pyramid_level_close_to_the_wanted_size_is_used_as_is():
    params = TissueParams()
    # 100,000² px at 0.499: 2048 px wanted; the 1,563 px level is within 3/4 of it
    dims = [(-(-100_000 // 2**i), -(-100_000 // 2**i)) for i in range(7)]
    assert params.mask_side(dims[0], 0.499, dims) == 1563
    assert TissueParams(mask_mpp=None).mask_side(dims[0], 0.499, dims) == 2048
    # no level close enough: the thumbnail is resized to the wanted side
    assert params.mask_side((10_000, 5_000), 0.5, [(10_000, 5_000), (2_500, 1_250)]) == 1250
    assert params.mask_side((10_000, 5_000), 0.5, [(10_000, 5_000), (900, 450)]) == 1250
    assert params.mask_side((10_000, 5_000), 0.5, [(10_000, 5_000), (1_000, 500)]) == 1000


def test_the_real_pyramids_4_um_level_is_the_tissue_mask():
    """The real 4-level pyramid (libvips): its 370 px level is exactly 4 µm/px and is used as is."""
    if not SAMPLE_PYRAMID.exists():
        pytest.skip(f"{SAMPLE_PYRAMID} not found")
    slide = open_slide(SAMPLE_PYRAMID)
    tm = detect_tissue(slide)
    assert tm.mask.shape == tuple(reversed(slide.level_dimensions[3]))


@pytest.mark.parametrize("path", [SAMPLE, SAMPLE_PYRAMID], ids=["svs", "pyramid"])
def test_default_patches_agree_with_the_hand_traced_tissue(path):
    """The kept 224 px patches (0.5 µm/px, min tissue 0.5) cover the hand-traced tissue of the
    sample: tile Dice at least 0.85 (hs2p's default scores 0.856 / 0.872 here, see
    bench/bench_tissue.py)."""
    if not path.exists():
        pytest.skip(f"{path} not found")
    slide = open_slide(path)
    grid = make_grid(slide, GridSpec(target_mpp=0.5, patch_size=224), detect_tissue(slide))
    hand = sample_hand_mask()
    covered = np.zeros_like(hand)
    s = grid.patch_size_level0
    for x, y in grid.coords:
        covered[y : y + s, x : x + s] = True
    tp = (covered & hand).sum()
    dice = 2 * tp / (covered.sum() + hand.sum())
    assert dice >= 0.85, (len(grid), dice)


def test_fake_slide_without_mpp_ignores_mask_mpp():
    rgb, _ = tma_image()
    tm = detect_tissue(FakeSlide(rgb, None))
    assert max(tm.mask.shape) == max(rgb.shape[:2])  # the whole (< 2048 px) image


def test_fraction_grid_is_area_exact_on_the_lattice(monkeypatch):
    """The separable lattice evaluation gives the exact covered areas: sub-pixel borders,
    squares partly outside the slide and a row table split into chunks included."""
    import napari_gpfm.tiles.tissue as tissue_mod

    rng = np.random.default_rng(11)
    mask = ndi.gaussian_filter(rng.random((90, 70)), 1.5) > 0.5
    tm = TissueMask(mask=mask, downsample=3.7)
    xs = np.arange(-20, 280, 23)
    ys = np.arange(-11, 350, 17)
    ref = _exact_fractions(mask, 3.7, xs, ys, 29.0)
    np.testing.assert_allclose(tm.fraction_grid(xs, ys, 29.0), ref, rtol=0, atol=1e-9)
    monkeypatch.setattr(tissue_mod, "_FRACTION_TABLE_ENTRIES", 300)  # 2 rows per chunk
    np.testing.assert_allclose(tm.fraction_grid(xs, ys, 29.0), ref, rtol=0, atol=1e-9)
    assert tm.fraction_grid([], ys, 29.0).shape == (len(ys), 0)


# ------------------------------------------------------------------ clean-up and lattice paths
@pytest.mark.parametrize("close_r", [0, 1, 2, 3])
@pytest.mark.parametrize("open_r", [0, 1, 2, 3])
def test_fused_close_open_matches_scipy(close_r, open_r):
    """The clean-up's closing (padded so tissue is not glued to the border) then opening, done
    in one flat buffer for radii up to 2, gives scipy's pixels."""
    from napari_gpfm.tiles.tissue import _close_open

    params = TissueParams(close_radius=close_r, open_radius=open_r)
    for m in _random_masks():
        ref = m
        if close_r and ref.any():
            ref = ndi.binary_closing(np.pad(ref, close_r), structure=_disk(close_r))
            ref = ref[close_r:-close_r, close_r:-close_r]
        if open_r and ref.any():
            ref = ndi.binary_opening(ref, structure=_disk(open_r))
        np.testing.assert_array_equal(_close_open(m, params), ref,
                                      err_msg=f"close {close_r} open {open_r}")  # fmt: skip


def test_byte_histogram_is_bincount():
    from napari_gpfm.tiles.tissue import _byte_histogram

    rng = np.random.default_rng(2)
    for n in (0, 1, 7, 20_000, 20_001, 100_003):
        v = rng.integers(0, 256, n, dtype=np.uint8)
        v[: n // 3] = 17  # long runs of one value too
        np.testing.assert_array_equal(_byte_histogram(v), np.bincount(v, minlength=256))
    img = rng.integers(0, 256, (201, 157), dtype=np.uint8)  # 2-D, odd size
    np.testing.assert_array_equal(_byte_histogram(img), np.bincount(img.ravel(), minlength=256))


def test_component_sizes_are_bincount():
    from napari_gpfm.tiles.tissue import _component_sizes

    rng = np.random.default_rng(4)
    blobs = ndi.gaussian_filter(rng.random((300, 260)), 3) > 0.5  # long runs
    noise = rng.random((300, 260)) < 0.5  # short runs
    for mask in (blobs, ~blobs, noise, np.ones((70, 90), bool), np.zeros((70, 90), bool)):
        labels, n = ndi.label(mask)
        np.testing.assert_array_equal(_component_sizes(labels, n),
                                      np.bincount(labels.ravel(), minlength=n + 1))  # fmt: skip


def test_fraction_grid_without_the_table_equals_with_it():
    """``fraction_grid`` reads only the summed-area rows it needs when the table is not
    cached: the same values, bit for bit, as from the whole cached table."""
    rng = np.random.default_rng(8)
    mask = ndi.gaussian_filter(rng.random((211, 173)), 2) > 0.5
    xs, ys = np.arange(-30, 700, 41), np.arange(-5, 900, 37)
    lazy = TissueMask(mask=mask, downsample=4.3).fraction_grid(xs, ys, 53.0)
    full = TissueMask(mask=mask, downsample=4.3)
    full.integral()
    np.testing.assert_array_equal(lazy, full.fraction_grid(xs, ys, 53.0))
    rows = np.array([0, 1, 5, 6, 100, 211])
    np.testing.assert_array_equal(TissueMask(mask=mask, downsample=1.0)._integral_rows(rows),
                                  full.integral()[rows])  # fmt: skip
