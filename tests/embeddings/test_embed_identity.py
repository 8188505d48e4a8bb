"""Slide identity in feature stores: names, tiling folders, fingerprints, refusals, find_store."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from embed_helpers import FailingEncoder, strip_integrity
from synthetic_slides import write_tiff

from napari_gpfm.embeddings import (
    RecipeMismatchError,
    SlideMismatchError,
    StoreError,
    StoreWriter,
    embed,
    embed_slide,
    find_store,
    make_recipe,
    open_store,
    partial_path,
    recipe_store_path,
    store_path,
    tiling_dir_name,
)
from napari_gpfm.slide import open_slide, slide_fingerprint
from napari_gpfm.tiles import GridSpec, TissueParams

FAST = TissueParams(thumbnail_max_side=512)
SPEC = GridSpec(target_mpp=1.0, patch_size=224, min_tissue=0.3)


def run(path, encoder, out, **kw):
    kw.setdefault("tissue_params", FAST)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 2)
    return embed(path, encoder, kw.pop("spec", SPEC), out, **kw)


@pytest.fixture
def crop(sample_path) -> np.ndarray:
    """A 1200 px tissue crop of the sample slide: small, quick to embed."""
    return open_slide(sample_path).read_region(600, 1000, 0, 1200, 1200)


def snapshot(path):
    return path.read_bytes(), os.stat(path).st_mtime_ns


def test_tiling_dir_name_and_store_path():
    assert tiling_dir_name(0.5, 224, 0) == "0.5mpp_224px_0px_overlap"
    assert tiling_dir_name(0.25, 512) == "0.25mpp_512px_0px_overlap"
    assert tiling_dir_name(2.0, 128, 32) == "2mpp_128px_32px_overlap"
    p = store_path("out", "gpfm", "case1.HE", "0.5mpp_224px_0px_overlap")
    assert p.as_posix() == "out/0.5mpp_224px_0px_overlap/features_gpfm/case1.HE.h5"


def test_same_stem_different_stains_get_two_names_and_two_stores(tmp_path, sample_path, encoder):
    slides = []
    for name in ("case1.HE.svs", "case1.CD3.svs"):
        link = tmp_path / "slides" / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(sample_path)
        slides.append(open_slide(link))
    assert [s.name for s in slides] == ["case1.HE", "case1.CD3"]
    recipe = make_recipe(encoder, slides[0], SPEC, FAST)
    paths = [recipe_store_path(tmp_path / "out", recipe, s.name) for s in slides]
    assert paths[0] != paths[1]
    made = [run(s, encoder, tmp_path / "out") for s in slides]
    assert made == paths and all(p.exists() for p in made)
    assert [open_store(p).slide_name for p in made] == ["case1.HE", "case1.CD3"]


def test_store_records_the_slide_fingerprint_and_path(tmp_path, crop, encoder):
    tif = write_tiff(tmp_path / "X.tif", crop)
    path = run(tif, encoder, tmp_path / "out")
    fp = slide_fingerprint(open_slide(tif))
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["gpfm_slide_fingerprint"]) == json.loads(fp.to_json())
        assert f.attrs["gpfm_slide_path"] == str(tif.resolve())
    store = open_store(path)
    assert store.slide_fingerprint == fp and store.slide_path == str(tif.resolve())


def test_other_file_with_the_same_name_is_refused_naming_both(tmp_path, crop, encoder):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = write_tiff(tmp_path / "a" / "X.tif", crop)
    second = write_tiff(tmp_path / "b" / "X.tif", crop[:800])  # another slide, same name
    out = tmp_path / "out"
    path = run(first, encoder, out)
    before = snapshot(path)

    with pytest.raises(SlideMismatchError) as e:
        run(second, encoder, out)
    msg = str(e.value)
    assert str(first.resolve()) in msg and str(second.resolve()) in msg
    assert "1200×1200 px" in msg and "1200×800 px" in msg and "same name" in msg
    assert e.value.path == path
    assert snapshot(path) == before and not partial_path(path).exists()
    with pytest.raises(SlideMismatchError):  # the generator refuses before yielding anything
        next(embed_slide(second, encoder, SPEC, out, tissue_params=FAST, num_workers=0))

    # overwrite replaces the store with the second file's features
    run(second, encoder, out, overwrite=True)
    assert open_store(path, expected_slide=open_slide(second)).slide_path == str(second.resolve())


def test_resume_after_the_slide_file_was_replaced_is_refused(tmp_path, crop, encoder):
    tif = write_tiff(tmp_path / "X.tif", crop)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected"):
        run(tif, FailingEncoder(encoder, fail_after=1), out)
    final = recipe_store_path(out, make_recipe(encoder, open_slide(tif), SPEC, FAST), "X")
    part = partial_path(final)
    with h5py.File(part, "r") as f:
        assert f.attrs["gpfm_n_done"] == 2
    before = snapshot(part)

    write_tiff(tif, crop[:, ::-1])  # replaced: same name, size in pixels and mpp, mirrored
    with pytest.raises(SlideMismatchError, match="same path") as e:
        run(tif, encoder, out)
    assert str(tif.resolve()) in str(e.value)
    assert snapshot(part) == before and not final.exists()

    # overwrite starts afresh: the result equals a clean run of the new file
    got = open_store(run(tif, encoder, out, overwrite=True)).features
    ref = open_store(run(tif, encoder, tmp_path / "ref")).features
    np.testing.assert_array_equal(got, ref)


def test_writer_resume_refuses_a_partial_of_another_file_even_when_all_else_fits(tmp_path, crop,
                                                                                  encoder):
    a = write_tiff(tmp_path / "a.tif", crop)
    b = write_tiff(tmp_path / "b.tif", crop[::-1])
    slide_a, slide_b = open_slide(a), open_slide(b)
    recipe = make_recipe(encoder, slide_a, SPEC, FAST)
    coords = np.array([[0, 0], [448, 0], [0, 448]], np.int64)
    final = recipe_store_path(tmp_path / "out", recipe, "X")
    w = StoreWriter.create(final, recipe=recipe, coords=coords, embed_dim=4, slide_name="X",
                           level0_width=1200, level0_height=1200,
                           slide_fingerprint=slide_fingerprint(slide_a))
    w.write(np.zeros((1, 4), np.float32))
    w.close()
    with pytest.raises(SlideMismatchError, match="a.tif.*b.tif"):
        StoreWriter.resume(final, recipe=recipe, coords=coords, embed_dim=4,
                           slide_fingerprint=slide_fingerprint(slide_b))
    w = StoreWriter.resume(final, recipe=recipe, coords=coords, embed_dim=4,
                           slide_fingerprint=slide_fingerprint(slide_a))
    assert w is not None and w.n_done == 1
    w.close()


def test_other_tiling_gets_its_own_store_beside_the_first(tmp_path, crop, encoder):
    tif = write_tiff(tmp_path / "X.tif", crop)
    out = tmp_path / "out"
    p1 = run(tif, encoder, out)
    p2 = run(tif, encoder, out, spec=SPEC.replace(patch_size=112))
    p3 = run(tif, encoder, out, spec=SPEC.replace(target_mpp=2.0))
    assert len({p1, p2, p3}) == 3
    assert {p.parent.parent.name for p in (p1, p2, p3)} == {
        "1mpp_224px_0px_overlap", "1mpp_112px_0px_overlap", "2mpp_224px_0px_overlap"}
    assert [open_store(p).recipe.patch_size for p in (p1, p2, p3)] == [224, 112, 224]
    assert open_store(p1).n_patches < open_store(p2).n_patches


def test_find_store_returns_none_the_store_or_raises(tmp_path, crop, encoder):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = open_slide(write_tiff(tmp_path / "a" / "X.tif", crop))
    other = open_slide(write_tiff(tmp_path / "b" / "X.tif", crop[:800]))
    out = tmp_path / "out"
    recipe = make_recipe(encoder, first, SPEC, FAST)
    assert find_store(out, first, recipe) is None  # nothing yet

    with pytest.raises(RuntimeError, match="injected"):
        run(first, FailingEncoder(encoder, fail_after=1), out)
    assert find_store(out, first, recipe) is None  # only a partial file

    path = run(first, encoder, out)
    store = find_store(out, first, recipe)
    assert store is not None and store.path == path and store.recipe.key() == recipe.key()
    # the same file seen through a user mpp override (same value) is the same slide
    assert find_store(out, first.with_mpp(first.mpp), recipe).path == path

    with pytest.raises(SlideMismatchError, match="same name"):
        find_store(out, other, make_recipe(encoder, other, SPEC, FAST))
    with pytest.raises(RecipeMismatchError, match="min_tissue"):  # same tiling, other recipe
        find_store(out, first, make_recipe(encoder, first, SPEC.replace(min_tissue=0.9), FAST))
    # another tiling: another path, nothing there
    assert find_store(out, first, make_recipe(encoder, first, SPEC.replace(target_mpp=2.0),
                                              FAST)) is None


def test_find_store_refuses_another_tools_file(tmp_path, crop, encoder):
    slide = open_slide(write_tiff(tmp_path / "X.tif", crop))
    recipe = make_recipe(encoder, slide, SPEC, FAST)
    path = recipe_store_path(tmp_path, recipe, "X")
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((2, 4), np.float32)
        f["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(StoreError, match="not written by napari-gpfm"):
        find_store(tmp_path, slide, recipe)


def test_open_store_checks_the_expected_slide(tmp_path, crop, encoder):
    a = open_slide(write_tiff(tmp_path / "a.tif", crop))
    b = open_slide(write_tiff(tmp_path / "b.tif", crop[::-1]))  # same size in px, other file
    path = run(a, encoder, tmp_path / "out")
    assert open_store(path, expected_slide=a).path == path
    assert open_store(path, expected_slide=slide_fingerprint(a)).path == path
    assert open_store(path).path == path  # no expectation: no check
    with pytest.raises(SlideMismatchError) as e:
        open_store(path, expected_slide=b)
    assert "a.tif" in str(e.value) and "b.tif" in str(e.value)
    assert e.value.recorded_fingerprint == slide_fingerprint(a)
    assert e.value.current_fingerprint == slide_fingerprint(b)


def test_stores_without_fingerprint_are_checked_by_dimensions(tmp_path, crop, encoder):
    """Stores written before fingerprints: level-0 width/height decide."""
    slide = open_slide(write_tiff(tmp_path / "X.tif", crop))
    same_size = open_slide(write_tiff(tmp_path / "same.tif", crop[::-1]))
    smaller = open_slide(write_tiff(tmp_path / "small.tif", crop[:800]))
    path = run(slide, encoder, tmp_path / "out")
    with h5py.File(path, "a") as f:
        del f.attrs["gpfm_slide_fingerprint"]
        del f.attrs["gpfm_slide_path"]
        strip_integrity(f)  # as old as that: no checksums either
    assert open_store(path, expected_slide=slide).path == path
    assert open_store(path, expected_slide=same_size).path == path  # cannot tell: accepted
    with pytest.raises(SlideMismatchError, match=r"1200×1200 px; the feature file records no slide fingerprint"):
        open_store(path, expected_slide=smaller)
    recipe = make_recipe(encoder, slide, SPEC, FAST)
    assert find_store(tmp_path / "out", slide, recipe).path == path
    # and an old store is reused by a rerun (skipped), not refused
    records = list(embed_slide(slide, encoder, SPEC, tmp_path / "out", tissue_params=FAST,
                               num_workers=0))
    assert [r.status for r in records] == ["skipped"]
