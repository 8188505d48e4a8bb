"""Opening real slides headless: geometry, metadata, pixels and the tile cache."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import tiffslide

from napari_gpfm.slide import MissingMppError, open_slide
from napari_gpfm.slide.cache import TileCache
from napari_gpfm.slide.slide import Slide


def test_sample_svs_metadata(sample_svs):
    slide = open_slide(sample_svs)
    assert slide.dimensions == (2220, 2967)
    assert slide.mpp == pytest.approx(0.499)
    assert slide.mpp_source == "file"
    assert slide.vendor == "aperio"
    assert slide.objective_power == 20
    assert slide.level_tile_sizes[0] == (240, 240)
    assert set(slide.associated_names) == {"thumbnail", "label", "macro"}
    assert slide.associated_image("label").shape == (463, 387, 3)
    assert slide.properties["aperio.AppMag"] == "20"


@pytest.mark.parametrize("fixture", ["sample_svs", "pyramid_tif", "ome_tiff"])
def test_level_pixels_match_tifffile_on_every_level(fixture, request):
    """The levels napari browses are the file's own pixels (region reads at level-0 coordinates
    follow OpenSlide: tests/slide/test_openslide_parity.py)."""
    path = request.getfixturevalue(fixture)
    slide = open_slide(path)
    with tiffslide.TiffSlide(str(path)) as ref:
        assert slide.level_count == ref.level_count
        assert slide.level_dimensions == [tuple(d) for d in ref.level_dimensions]
        np.testing.assert_array_equal(
            slide.read_region(133, 517, 0, 300, 200),
            np.asarray(ref.read_region((133, 517), 0, (300, 200)))[..., :3],
        )
    with tifffile.TiffFile(path) as tif:
        for level, pages in enumerate(tif.series[0].levels):
            np.testing.assert_array_equal(np.asarray(slide.levels[level]), pages.asarray())


def test_pyramid_levels_and_best_level(pyramid_tif):
    slide = open_slide(pyramid_tif)
    assert slide.level_dimensions == [(2220, 2967), (1110, 1483), (555, 741)]
    assert slide.best_level_for_downsample(1.0) == 0
    assert slide.best_level_for_downsample(2.0) == 1
    assert slide.best_level_for_downsample(3.5) == 1
    assert slide.best_level_for_downsample(100) == 2


def test_read_patch_resizes_from_the_best_level(pyramid_tif):
    slide = open_slide(pyramid_tif)
    patch = slide.read_patch(400, 800, size0=448, out_size=224)
    assert patch.shape == (224, 224, 3) and patch.dtype == np.uint8
    # The 448-px level-0 field read at level 1 is exactly level 1's 224-px region.
    np.testing.assert_array_equal(patch, slide.read_region(400, 800, 1, 224, 224))
    batch = slide.read_patches([(400, 800), (0, 0)], 448, 224, threads=2)
    np.testing.assert_array_equal(batch[0], patch)


def test_region_outside_the_image_is_white(sample_svs):
    slide = open_slide(sample_svs)
    region = slide.read_region(2100, 2900, 0, 300, 200)
    assert region.shape == (200, 300, 3)
    assert (region[100:, :] == 255).all() and (region[:, 150:] == 255).all()


def test_each_native_tile_is_decoded_once(sample_svs):
    slide = open_slide(sample_svs)
    slide._cache = TileCache()
    calls = []
    original = slide.backend.read_tile
    slide.backend.read_tile = lambda *a: calls.append(a) or original(*a)
    slide.read_region(0, 0, 0, 480, 480)  # 4 tiles of 240
    slide.read_region(100, 100, 0, 300, 300)  # the same 4 tiles
    assert len(calls) == 4


def test_missing_mpp_is_never_invented(nompp_tif):
    slide = open_slide(nompp_tif)
    assert slide.mpp is None and slide.mpp_source is None
    with pytest.raises(MissingMppError, match="--mpp"):
        slide.require_mpp("embedding")
    fixed = slide.with_mpp(0.25)
    assert fixed.mpp == 0.25 and fixed.mpp_source == "user"
    assert open_slide(nompp_tif, mpp=0.5).mpp == 0.5


def test_large_single_level_slide_gets_virtual_levels(tmp_path):
    from synthetic_slides import make_large_pyramid

    path = make_large_pyramid(tmp_path / "flat.tif", 9000, 5000, min_side=10**9)  # no reduced levels
    slide = open_slide(path)
    assert not slide.has_native_pyramid
    assert slide.level_dimensions[:3] == [(9000, 5000), (4500, 2500), (2250, 1250)]
    low = slide.read_region(0, 0, 2, 256, 256)
    full = slide.read_region(0, 0, 0, 1024, 1024)
    expected = full.reshape(256, 4, 256, 4, 3).mean((1, 3))
    assert np.abs(low.astype(float) - expected).mean() < 2.0


def test_dicom_wsi_folder_matches_the_svs(dicom_dir, sample_svs):
    slide = open_slide(dicom_dir)
    assert slide.vendor == "dicom"
    assert slide.dimensions == (2220, 2967)
    assert slide.mpp == pytest.approx(0.499)
    assert "label" in slide.associated_names
    np.testing.assert_array_equal(
        slide.read_region(100, 200, 0, 300, 200), open_slide(sample_svs).read_region(100, 200, 0, 300, 200)
    )
    one_file = next(dicom_dir.glob("*.dcm"))
    assert open_slide(one_file).dimensions == (2220, 2967)


def test_openslide_backend_reads_the_same_pixels(pyramid_tif):
    from napari_gpfm.slide.backends.openslide import OpenSlideBackend

    slide = Slide(OpenSlideBackend(pyramid_tif))
    assert slide.vendor == "generic-tiff"
    assert slide.mpp == pytest.approx(0.499, abs=1e-4)
    ours = open_slide(pyramid_tif)
    # Reduced levels have fractional downsamples (2.0003): both read as OpenSlide does.
    for level in range(3):
        np.testing.assert_array_equal(
            slide.read_region(701, 303, level, 300, 250), ours.read_region(701, 303, level, 300, 250)
        )


def test_level_array_indexing_like_numpy(pyramid_tif):
    slide = open_slide(pyramid_tif)
    level = slide.levels[1]
    assert level.shape == (1483, 1110, 3) and level.dtype == np.uint8
    full = np.asarray(level)
    np.testing.assert_array_equal(level[10:50, 20:90], full[10:50, 20:90])
    np.testing.assert_array_equal(level[5, 7], full[5, 7])
    np.testing.assert_array_equal(level[::3, 100:130:2, 0], full[::3, 100:130:2, 0])
    np.testing.assert_array_equal(level[..., 1][30:40, 30:40], full[30:40, 30:40, 1])


def test_stripped_pyramid_levels_are_the_files_own_pixels(tmp_path, sample_rgb):
    """Levels stored in strips (not tiles) go through tiffslide by level-0 coordinates: each
    512-px window must map back to its own level pixels at downsample 2.0003 (no 1-px shift)."""
    path = tmp_path / "stripped.tif"
    levels = [sample_rgb, sample_rgb[:2966:2, :2220:2]]
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], photometric="rgb", rowsperstrip=64)
        tif.write(levels[1], photometric="rgb", rowsperstrip=64, subfiletype=1)
    slide = open_slide(path)
    assert slide.level_dimensions == [(2220, 2967), (1110, 1483)]
    assert slide.level_tile_sizes[1] == (512, 512)  # read through the fallback path
    np.testing.assert_array_equal(np.asarray(slide.levels[1]), levels[1])
