"""The GPFM card's default tiling is its authors' field of view; TRIDENT's is a named preset;
the authors' scripts' literal level-0 count is an option. Checked on slides at 0.2527 µm/px (a
40× Aperio scan) and 0.5 µm/px (20×)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from napari_gpfm.embeddings import Level0Tiling, default_spec, spec_for_slide, tiling_dir_name
from napari_gpfm.encoders import get_card
from napari_gpfm.jobs._cli import build_spec, register
from napari_gpfm.slide import MissingMppError
from napari_gpfm.tiles import PRESETS, make_grid

#: GPFM's authors: 512 px tiles at 40× (0.25 µm/px) resized to 224 (the shared reference).
AUTHORS_FIELD_UM = 512 * 0.25
GPFM_INPUT = 224


def slide(mpp: float, size: int = 8192) -> SimpleNamespace:
    return SimpleNamespace(path=f"slide-{mpp}.svs", name=f"s{mpp}", mpp=mpp, mpp_source="file",
                           level_dimensions=[(size, size)], level_downsamples=[1.0])  # fmt: skip


def gpfm_default():
    return default_spec(SimpleNamespace(card=get_card("gpfm")))


@pytest.mark.parametrize("mpp, level0_px", [(0.2527, 507), (0.5, 256)])
def test_gpfm_default_is_the_authors_field_of_view(mpp, level0_px):
    card = get_card("gpfm")
    grid = make_grid(slide(mpp), gpfm_default(), encoder_input=card.input.size)
    assert grid.patch_size_level0 == level0_px  # round(128 µm / mpp)
    field = grid.patch_size_level0 * mpp
    assert abs(field - AUTHORS_FIELD_UM) <= mpp / 2  # 128 µm, to half a level-0 pixel
    assert grid.out_size == GPFM_INPUT == card.input.size  # resized to the model's input
    assert grid.spec.field_um == pytest.approx(AUTHORS_FIELD_UM)
    assert grid.stride_level0 == grid.patch_size_level0  # no overlap


def test_default_equals_the_authors_preset_not_tridents():
    spec = gpfm_default()
    authors, trident = PRESETS["gpfm-40x-512to224"], PRESETS["gpfm-20x-224"]
    assert (spec.target_mpp, spec.patch_size) == (authors.target_mpp, authors.patch_size)
    assert spec.field_um != pytest.approx(trident.field_um)
    assert tiling_dir_name(spec.target_mpp, spec.patch_size) == "0.25mpp_512px_0px_overlap"


@pytest.mark.parametrize("mpp, level0_px", [(0.2527, 443), (0.5, 224)])
def test_trident_preset_is_224_px_at_half_a_micron(mpp, level0_px):
    grid = make_grid(slide(mpp), PRESETS["gpfm-20x-224"], encoder_input=224)
    assert grid.patch_size_level0 == level0_px
    assert grid.patch_size_level0 * mpp == pytest.approx(112.0, abs=mpp / 2)


@pytest.mark.parametrize("mpp", [0.2527, 0.5])
def test_level0_option_cuts_512_level0_pixels_whatever_the_mpp(mpp):
    spec = spec_for_slide(Level0Tiling(512), slide(mpp))
    grid = make_grid(slide(mpp), spec, encoder_input=GPFM_INPUT)
    assert grid.patch_size_level0 == 512 and grid.out_size == GPFM_INPUT
    assert spec.field_um == pytest.approx(512 * mpp)  # 129.4 µm at 0.2527: the scripts' field
    assert tiling_dir_name(spec.target_mpp, spec.patch_size) == f"{mpp:g}mpp_512px_0px_overlap"


def test_level0_option_needs_an_mpp():
    with pytest.raises(MissingMppError):
        Level0Tiling(512).for_slide(SimpleNamespace(path="x.tif", mpp=None))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["embed", "s.svs", "--out", "o", *argv])


def test_cli_default_and_level0_option():
    card = get_card("gpfm")
    assert build_spec(parse(), card) == gpfm_default()
    assert build_spec(parse("--preset", "gpfm-20x-224"), card) == PRESETS["gpfm-20x-224"]
    spec = build_spec(parse("--level0-px", "512", "--overlap", "64"), card)
    assert spec == Level0Tiling(512, 64)
    from napari_gpfm.errors import UsageError

    with pytest.raises(UsageError, match="--level0-px"):
        build_spec(parse("--level0-px", "512", "--patch-size", "224"), card)
    with pytest.raises(SystemExit):  # one way to say the field
        parse("--level0-px", "512", "--target-mpp", "0.5")


def test_demo_student_keeps_tridents_tiling():
    """The README's demo output folder (0.5mpp_224px_0px_overlap) stays true."""
    spec = default_spec(SimpleNamespace(card=get_card("gpfm-demo-student-vit-ti14")))
    assert tiling_dir_name(spec.target_mpp, spec.patch_size) == "0.5mpp_224px_0px_overlap"


def test_embed_with_level0_tiling_records_the_exact_field(encoder, tmp_path):
    import numpy as np
    from synthetic_slides import write_tiff

    from napari_gpfm.embeddings import embed, open_store
    from napari_gpfm.tiles import TissueParams

    rgb = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    tif = write_tiff(tmp_path / "L.tif", rgb, mpp=0.2527)
    path = embed(tif, encoder, Level0Tiling(256, min_tissue=0.0), tmp_path / "out",
                 tissue_params=TissueParams(method="none"), num_workers=0)  # fmt: skip
    assert path.parent.parent.name == "0.2527mpp_256px_0px_overlap"
    store = open_store(path)
    assert store.recipe.patch_size_level0 == 256 and store.n_patches == 4
    assert store.recipe.target_mpp * store.recipe.patch_size == pytest.approx(256 * 0.2527)
