"""Tissue detection on real H&E pixels: whole slides, all-tissue crops, TMA cores, patches.

Every image is built from real H&E pixels (the bundled sample slide, the labelled CRC patches in
``../shared/data``) together with a hand-made mask: the crop is all tissue, the TMA cores are
their discs, the whole slide has a hand-traced outline (``tiles_helpers.SAMPLE_HAND_TISSUE``).
The detected tissue fraction must lie within a few points of the hand-made one.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from tiles_helpers import (
    CRC_TILES,
    SAMPLE,
    SAMPLE_MPP,
    SAMPLE_PYRAMID,
    FakeSlide,
    all_tissue_crop,
    issue_crop,
    mask_at_level0,
    sample_hand_mask,
    tma_image,
    write_pyramid,
)

from napari_gpfm.slide import open_slide
from napari_gpfm.tiles import GridSpec, NoTissueError, TissueParams, detect_tissue, make_grid
from napari_gpfm.tiles.tissue import DEFAULT_MASK_MPP, no_tissue_message, saturation

#: "Within a few points" of the hand-made tissue fraction.
POINTS = 0.04


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ------------------------------------------------------------------ all tissue: crops, patches
def test_all_tissue_crop_is_all_tissue(tmp_path):
    """The tissue-rich middle of the sample, saved as a small pyramid: 100 % tissue by hand.
    Otsu splits the tissue's own saturation histogram there (pale vs dark tissue)."""
    slide = open_slide(write_pyramid(tmp_path / "crop.tif", all_tissue_crop(), SAMPLE_MPP))
    tm = detect_tissue(slide)
    assert tm.tissue_fraction >= 1.0 - POINTS, tm.summary
    assert tm.rule == "absolute"
    assert re.fullmatch(r"tissue (9\d|100)% of the image \(auto: unimodal histogram → "
                        r"absolute rule, saturation ≥ 0\.07\)", tm.summary), tm.summary


def test_issue_crop_at_0227_keeps_every_patch(tmp_path):
    """Issue 14: a 1101 x 1101 H&E crop at 0.227 µm/px, all tissue. Every 224 px patch at
    0.5 µm/px must be kept at the default min_tissue (it was refused or cut before)."""
    slide = open_slide(write_pyramid(tmp_path / "roi.tif", issue_crop(), 0.227))
    tm = detect_tissue(slide)
    assert tm.tissue_fraction >= 1.0 - POINTS, tm.summary
    grid = make_grid(slide, GridSpec(target_mpp=0.5, patch_size=224), tm)
    assert len(grid) == grid.grid_shape[0] * grid.grid_shape[1] > 0


def _crc_tiles() -> list:
    return sorted(CRC_TILES.glob("*/*.png")) if CRC_TILES.is_dir() else []


@pytest.mark.skipif(not _crc_tiles(), reason=f"labelled H&E tiles not found in {CRC_TILES}")
@pytest.mark.parametrize("path", _crc_tiles(), ids=lambda p: p.stem)
def test_labelled_he_patches_are_all_tissue(path):
    """The 32 labelled CRC patches (224 px at 0.5 µm/px) are tissue edge to edge, fat (ADI),
    mucus (MUC) and debris (DEB) included."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    tm = detect_tissue(FakeSlide(rgb, 0.5, path=str(path)))
    assert tm.tissue_fraction >= 1.0 - POINTS, f"{path.parent.name}/{path.name}: {tm.summary}"


def _all_tissue_images() -> list:
    images = [pytest.param("crop", id="crop"), pytest.param("issue", id="issue-crop")]
    return images + [pytest.param(p, id=p.stem) for p in _crc_tiles() if p.parent.name != "ADI"]


@pytest.mark.parametrize("source", _all_tissue_images())
def test_all_tissue_images_are_tissue_pixel_by_pixel(source):
    """The same images with only fibre-gap-sized holes filled (max_hole_area_um2=2000): the
    pixel rule itself must call the tissue tissue, hole filling alone must not carry the
    result. (Fat, ADI, is left out: its cells are empty space that only hole filling makes
    tissue.)"""
    from PIL import Image

    if source == "crop":
        rgb, mpp = all_tissue_crop(), SAMPLE_MPP
    elif source == "issue":
        rgb, mpp = issue_crop(), 0.227
    else:
        rgb, mpp = np.asarray(Image.open(source).convert("RGB")), 0.5
    tm = detect_tissue(FakeSlide(rgb, mpp), TissueParams(max_hole_area_um2=2000.0))
    assert tm.tissue_fraction >= 1.0 - POINTS, f"{source}: {tm.summary}"


# ------------------------------------------------------------------ TMA cores, whole slides
def test_tma_cores_on_glass(tmp_path):
    rgb, hand = tma_image()
    slide = open_slide(write_pyramid(tmp_path / "tma.tif", rgb, SAMPLE_MPP))
    tm = detect_tissue(slide)
    assert tm.tissue_fraction == pytest.approx(hand.mean(), abs=POINTS), tm.summary
    assert _iou(mask_at_level0(tm, hand.shape), hand) > 0.85
    assert len(tm.polygons) == 5, "one tissue piece per core"
    assert tm.summary.startswith(f"tissue {100 * tm.tissue_fraction:.0f}% of the image (auto: ")


def test_tma_with_scanner_colour_cast_keeps_otsu():
    """A yellowish scan (glass saturation about 0.085, above the absolute rule's 0.07): the
    histogram is still bimodal, so "auto" must use Otsu and not call the glass tissue."""
    rgb, hand = tma_image(cast=(1.0, 0.995, 0.93))
    assert np.median(saturation(rgb[:100, :100])) > 0.075  # the glass really is tinted
    tm = detect_tissue(FakeSlide(rgb, SAMPLE_MPP))
    assert tm.rule == "otsu" and "bimodal histogram → Otsu" in tm.summary
    assert tm.tissue_fraction == pytest.approx(hand.mean(), abs=POINTS), tm.summary


@pytest.mark.parametrize("path", [SAMPLE, SAMPLE_PYRAMID], ids=["svs", "pyramid"])
def test_whole_slide_matches_hand_traced_outline(path):
    if not path.exists():
        pytest.skip(f"{path} not found")
    slide = open_slide(path)
    hand = sample_hand_mask()
    tm = detect_tissue(slide)
    assert tm.tissue_fraction == pytest.approx(hand.mean(), abs=POINTS), tm.summary
    assert _iou(mask_at_level0(tm, hand.shape), hand) > 0.78
    assert tm.rule == "otsu" and "bimodal histogram → Otsu" in tm.summary


# ------------------------------------------------------------------ no tissue, whole image
def test_blank_white_slide_raises_no_tissue_error_with_working_advice(white_tiff):
    from napari_gpfm.jobs.embed import preview_job

    slide = open_slide(white_tiff)
    tm = detect_tissue(slide)
    assert tm.is_empty and tm.summary.startswith("no tissue (auto: ")
    job = preview_job(slide, GridSpec(target_mpp=0.5, patch_size=224), TissueParams())
    with pytest.raises(NoTissueError) as e:
        for _ in job:
            pass
    msg = str(e.value)
    assert str(white_tiff) in msg and "no tissue found" in msg
    assert "auto" in msg  # what was tried
    assert "--tissue-method none" in msg and "Whole image" in msg
    assert "--min-tissue" not in msg and "method='fixed'" not in msg


def test_no_tissue_message_with_the_mask_says_what_was_tried(white_tiff):
    slide = open_slide(white_tiff)
    tm = detect_tissue(slide)
    msg = no_tissue_message(slide.path, tm.params, tissue=tm)
    assert tm.how in msg and "--min-tissue" not in msg
    # with the old methods, "auto" is offered too
    otsu = detect_tissue(slide, TissueParams(method="otsu"))
    msg = no_tissue_message(slide.path, otsu.params, tissue=otsu)
    assert "otsu" in msg and "--tissue-method auto" in msg and "--tissue-method none" in msg


def test_min_tissue_is_named_only_when_it_is_the_cause():
    rgb, _ = tma_image()
    tm = detect_tissue(FakeSlide(rgb, SAMPLE_MPP))
    msg = no_tissue_message("tma.tif", tm.params, "no patch reaches min_tissue=1.0", tissue=tm,
                            min_tissue=1.0)  # fmt: skip
    assert "--min-tissue (now 1)" in msg and tm.summary in msg
    # callers that only say so in ``detail`` get the same advice
    assert "--min-tissue" in no_tissue_message("tma.tif", tm.params,
                                               "no 448 px patch reaches min_tissue=0.5")
    assert "--min-tissue" not in no_tissue_message("tma.tif", tm.params, tissue=tm)


class _NoPixels(FakeSlide):
    def thumbnail_with_downsample(self, max_side):
        raise AssertionError("method 'none' must not read pixels")


def test_method_none_uses_the_whole_image():
    # 2240 = 10 patches exactly: the last row touches the bottom edge
    slide = _NoPixels(np.zeros((1, 1, 3), np.uint8), 0.5, dims=(5000, 2240))
    tm = detect_tissue(slide, TissueParams(method="none"))
    assert tm.tissue_fraction == 1.0 and tm.rule == "none"
    assert tm.summary.startswith("whole image used as tissue (method none")
    (poly,) = tm.polygons
    assert poly.exterior.max(0).tolist() == [5000, 2240]
    # every grid position is kept, even at min_tissue=1.0, up to the bottom-right corner
    grid = make_grid(slide, GridSpec(target_mpp=0.5, patch_size=224, min_tissue=1.0), tm)
    assert len(grid) == grid.grid_shape[0] * grid.grid_shape[1] == 10 * (5000 // 224)
    np.testing.assert_array_equal(grid.tissue_fraction, 1.0)


# ------------------------------------------------------------------ old behaviour kept
def test_method_otsu_is_the_old_detector():
    """``method="otsu"`` keeps the pre-"auto" behaviour (stores made with it stay
    reproducible): on the all-tissue crop it still splits the tissue."""
    tm = detect_tissue(FakeSlide(all_tissue_crop(), SAMPLE_MPP), TissueParams(method="otsu"))
    assert tm.rule == "otsu" and tm.summary.startswith("tissue ")
    assert tm.threshold > 0.3 and tm.tissue_fraction < 0.95
    assert "(otsu: Otsu, saturation > " in tm.summary


def test_saturation_values_unchanged():
    """The fast saturation gives the same float32 values as ``(max - min) / max``."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, :3] = 0
    mx = rgb.max(-1).astype(np.float32)
    mn = rgb.min(-1).astype(np.float32)
    ref = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)
    np.testing.assert_array_equal(saturation(rgb), ref)
    assert saturation(np.dstack([rgb, rgb[..., :1]])).shape == (64, 64)  # RGBA: alpha ignored


# The JSON of TissueParams() before "auto" existed: every store made until then recorded it.
OLD_DEFAULT = {"thumbnail_max_side": 2048, "method": "otsu", "min_saturation": 0.05,
               "close_radius": 2, "open_radius": 1, "min_area_um2": 5000.0, "min_area_px": 16,
               "fill_holes": True, "max_hole_area_um2": 50000.0}  # fmt: skip


def test_params_json_stable_for_old_recipes():
    """No field was added: old parameter sets round-trip to the same JSON, hence the same
    recipe key; the new default differs from the old one in ``method`` only."""
    from napari_gpfm.embeddings.recipe import EmbeddingRecipe

    assert TissueParams.from_dict(OLD_DEFAULT).to_dict() == OLD_DEFAULT
    assert TissueParams(method="otsu").to_dict() == OLD_DEFAULT
    assert TissueParams.from_dict(OLD_DEFAULT).mask_mpp is None  # masks made as before
    new = TissueParams().to_dict()
    assert {k for k in new if new[k] != OLD_DEFAULT.get(k)} == {"method", "mask_mpp"}
    assert new["method"] == "auto" and new["mask_mpp"] == DEFAULT_MASK_MPP
    # an "auto" parameter set recorded before mask_mpp existed keeps its JSON and masks
    old_auto = dict(OLD_DEFAULT, method="auto")
    assert TissueParams.from_dict(old_auto).to_dict() == old_auto
    assert TissueParams.from_dict(new) == TissueParams()

    def recipe(tissue: dict) -> EmbeddingRecipe:
        return EmbeddingRecipe(model="gpfm", weights_sha256=None, mpp=0.499, mpp_source="file",
                               target_mpp=0.5, patch_size=224, input_size=224,
                               patch_size_level0=224, overlap=0, min_tissue=0.5,
                               tissue_params=tissue)  # fmt: skip

    old_key = recipe(OLD_DEFAULT).key()
    assert recipe(TissueParams.from_dict(OLD_DEFAULT).to_dict()).key() == old_key
    assert recipe(TissueParams().to_dict()).key() != old_key


def test_old_store_still_opens(tmp_path):
    """A store written with the old default parameters opens with ``method="otsu"``; the new
    default ("auto") is another recipe, reported as such (not a damaged file)."""
    from napari_gpfm.embeddings.recipe import EmbeddingRecipe
    from napari_gpfm.embeddings.store import RecipeMismatchError, StoreWriter, open_store

    def recipe(tissue: dict) -> EmbeddingRecipe:
        return EmbeddingRecipe(model="gpfm", weights_sha256=None, mpp=0.499, mpp_source="file",
                               target_mpp=0.5, patch_size=224, input_size=224,
                               patch_size_level0=224, overlap=0, min_tissue=0.5,
                               tissue_params=tissue)  # fmt: skip

    coords = np.array([[0, 0], [224, 0]], np.int64)
    w = StoreWriter.create(tmp_path / "old.h5", recipe=recipe(OLD_DEFAULT), coords=coords,
                           embed_dim=4, slide_name="old", level0_width=448,
                           level0_height=224)  # fmt: skip
    w.write(np.zeros((2, 4), np.float32))
    path = w.finish()
    store = open_store(path, expected_recipe=recipe(TissueParams(method="otsu").to_dict()))
    assert store.n_patches == 2
    assert TissueParams.from_dict(store.recipe.tissue_params).method == "otsu"
    with pytest.raises(RecipeMismatchError, match="tissue_params"):
        open_store(path, expected_recipe=recipe(TissueParams().to_dict()))
