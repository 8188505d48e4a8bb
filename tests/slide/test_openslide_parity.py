"""Region reads give OpenSlide's pixels at every level, for the same level-0 coordinates.

OpenSlide interpolates where ``x / downsample`` falls between two pixels of a level (see
:mod:`napari_gpfm.slide.resample`); these tests compare ``Slide.read_region`` with
``openslide.OpenSlide.read_region`` on the same files: OpenSlide's own test pyramid
(``boxes.tiff``, downsamples 4.016 and 8.086, deflate: no decoder in the way), a tiny Aperio SVS
(JPEG), the project's JPEG pyramids (downsample 2.0003) and DICOM. Equality is exact: the JPEG
decoders agree (level 0 is compared too), and where OpenSlide returns transparent pixels
(outside the image) the slide is white.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_gpfm.slide import open_slide
from napari_gpfm.slide.backends.openslide import OpenSlideBackend
from napari_gpfm.slide.slide import Slide

# (x, y, width, height) in level-0 pixels: origin, odd offsets, negative ones (OpenSlide shifts
# by int(-x / ds)), and (scaled per level below) regions across tile seams and image edges.
FIXED = [(0, 0, 40, 30), (1, 1, 37, 23), (3, 5, 50, 41), (7, 13, 29, 61), (33, 21, 64, 64),
         (-5, -3, 40, 40), (-17, 9, 33, 20), (2, -11, 25, 35)]  # fmt: skip


def _regions(slide, level: int, n_random: int, seed: int):
    w0, h0 = slide.dimensions
    ds = slide.level_downsamples[level]
    tw, th = slide.level_tile_sizes[level]
    lw, lh = slide.level_dimensions[level]
    regions = list(FIXED)
    # across the first tile seam, and over the right/bottom edges
    regions.append((int((tw - 3) * ds) + 1, int((th - 2) * ds) + 3, 9, 7))
    regions.append((int((lw - 5) * ds) + 1, int((lh - 4) * ds), 12, 10))
    regions.append((0, 0, lw, lh))
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        regions.append((int(rng.integers(-20, w0)), int(rng.integers(-20, h0)),
                        int(rng.integers(1, 200)), int(rng.integers(1, 200))))  # fmt: skip
    return regions


def _openslide_rgb(osr, x, y, level, w, h) -> np.ndarray:
    rgba = np.asarray(osr.read_region((x, y), level, (w, h)))
    return np.where(rgba[..., 3:4] == 0, 255, rgba[..., :3]).astype(np.uint8)


def _assert_same_pixels(slide, osr, level, regions, label):
    for x, y, w, h in regions:
        ours = slide.read_region(x, y, level, w, h)
        theirs = _openslide_rgb(osr, x, y, level, w, h)
        if not np.array_equal(ours, theirs):
            diff = np.abs(ours.astype(int) - theirs)
            raise AssertionError(
                f"{label} level {level} region {(x, y, w, h)}: {int((diff > 0).sum())} values "
                f"differ from OpenSlide's (max {int(diff.max())})"
            )


@pytest.mark.parametrize(
    "name",
    ["openslide-python/boxes.tiff", "openslide-python/small.svs", "pyramid_tif", "sample_svs"],
)
def test_regions_equal_openslide_at_every_level(name, request, openslide_module):
    if "/" in name:  # a third-party file
        path = request.getfixturevalue("third_party") / name
    else:
        path = request.getfixturevalue(name)
    slide = open_slide(path)
    with openslide_module.OpenSlide(str(path)) as osr:
        assert slide.level_dimensions == list(osr.level_dimensions)
        assert slide.level_downsamples == list(osr.level_downsamples)
        for level in range(slide.level_count):
            _assert_same_pixels(slide, osr, level, _regions(slide, level, 25, level), path.name)


def test_fractional_levels_are_interpolated_not_picked(openslide_module, third_party):
    """At boxes.tiff level 2 (downsample 4.016) an odd offset lands between pixels: OpenSlide
    mixes the two neighbours, so neither floor(x / ds) (the old rule) nor rounding matches."""
    path = third_party / "openslide-python" / "boxes.tiff"
    slide = open_slide(path)
    ds = slide.level_downsamples[2]
    assert ds == pytest.approx(4.016129, abs=1e-6)
    native = np.asarray(slide.levels[2])
    ours = slide.read_region(7, 13, 2, 60, 40)
    for pick in (np.floor, np.round):
        u, v = int(pick(7 / ds)), int(pick(13 / ds))
        assert not np.array_equal(ours, native[v : v + 40, u : u + 60])
    with openslide_module.OpenSlide(str(path)) as osr:
        np.testing.assert_array_equal(ours, _openslide_rgb(osr, 7, 13, 2, 60, 40))


def test_ome_subifd_levels_equal_openslide_on_the_same_pyramid(
    ome_tiff, pyramid_tif, openslide_module
):
    """OpenSlide does not read OME SubIFD levels; the OME-TIFF fixture holds the same tiles as
    the plain pyramid, which OpenSlide reads: the same regions, pixel for pixel."""
    ome = open_slide(ome_tiff)
    assert ome.level_dimensions == open_slide(pyramid_tif).level_dimensions
    OpenSlide = openslide_module.OpenSlide
    with OpenSlide(str(pyramid_tif)) as osr, OpenSlide(str(ome_tiff)) as osr_ome:
        assert osr_ome.level_count == 1  # what OpenSlide itself sees in the OME-TIFF
        _assert_same_pixels(ome, osr_ome, 0, _regions(ome, 0, 5, 7), ome_tiff.name)
        for level in range(ome.level_count):
            regions = _regions(ome, level, 10, 11 + level)
            _assert_same_pixels(ome, osr, level, regions, ome_tiff.name)


def test_regions_wider_than_4096_are_painted_in_chunks_like_openslide(
    pyramid_tif, openslide_module
):
    """OpenSlide paints 4096-px chunks from level-0 ``int(x + 4096 * ds)``; starting far left
    (or up) puts the image across the chunk boundary."""
    slide = open_slide(pyramid_tif)
    regions = [(-7, 5, 4500, 24), (13, -9, 20, 4300), (-8000, 5, 4500, 24), (9, -8000, 24, 4400)]
    with openslide_module.OpenSlide(str(pyramid_tif)) as osr:
        for level in (1, 2):
            _assert_same_pixels(slide, osr, level, regions, "pyramid.tif")
        assert (osr.read_region((-8000, 5), 1, (4500, 24)).getchannel("A").getextrema()[1]) == 255


def test_read_patch_is_the_openslide_region_resized(pyramid_tif, openslide_module):
    slide = open_slide(pyramid_tif)
    with openslide_module.OpenSlide(str(pyramid_tif)) as osr:
        # 448 level-0 px read at level 1 (downsample 2.0003) as 224 px: OpenSlide's region itself
        np.testing.assert_array_equal(
            slide.read_patch(401, 803, size0=448, out_size=224),
            _openslide_rgb(osr, 401, 803, 1, 224, 224),
        )
        # 1000 level-0 px from level 2 (250 px there) resized to 224 px (bicubic)
        side = round(1000 / slide.level_downsamples[2])
        expected = Image.fromarray(_openslide_rgb(osr, 333, 517, 2, side, side)).resize(
            (224, 224), Image.Resampling.BICUBIC
        )
        np.testing.assert_array_equal(
            slide.read_patch(333, 517, size0=1000, out_size=224), np.asarray(expected)
        )


def test_dicom_regions_equal_openslide(dicom_dir, openslide_module):
    volume = next(f for f in sorted(dicom_dir.glob("*.dcm")) if _image_type(f) == "VOLUME")
    slide = open_slide(volume)
    with openslide_module.OpenSlide(str(volume)) as osr:
        for level in range(slide.level_count):
            _assert_same_pixels(slide, osr, level, _regions(slide, level, 10, 3), "DICOM")


def test_openslide_backend_reads_are_openslides_own(pyramid_tif, openslide_module):
    """The OpenSlide backend (MRXS, BIF, Philips, fallback) hands region reads to OpenSlide:
    equal to OpenSlide and to the TIFF backend at fractional downsamples."""
    via_openslide = Slide(OpenSlideBackend(pyramid_tif))
    via_tiff = open_slide(pyramid_tif)
    with openslide_module.OpenSlide(str(pyramid_tif)) as osr:
        for level in range(via_openslide.level_count):
            regions = _regions(via_openslide, level, 6, 20 + level)
            _assert_same_pixels(via_openslide, osr, level, regions, "OpenSlide backend")
            for x, y, w, h in regions[:6]:
                np.testing.assert_array_equal(
                    via_openslide.read_region(x, y, level, w, h),
                    via_tiff.read_region(x, y, level, w, h),
                )


def _image_type(path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).ImageType[2])
