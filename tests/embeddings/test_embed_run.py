"""The embed run: resumable, skip/overwrite, refusals, exact-mpp metadata."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from embed_helpers import FailingEncoder

from napari_gpfm.embeddings import (
    IncompleteStoreError,
    NoTissueError,
    RecipeMismatchError,
    embed,
    embed_slide,
    open_store,
    partial_path,
    store_path,
    tiling_dir_name,
)
from napari_gpfm.slide import MissingMppError, open_slide
from napari_gpfm.tiles import PRESETS, GridSpec, TissueParams

FAST = TissueParams(thumbnail_max_side=512)
SPEC = PRESETS["gpfm-20x-224"]
TILING = tiling_dir_name(SPEC.target_mpp, SPEC.patch_size, SPEC.overlap)


def run(path, encoder, out, **kw):
    kw.setdefault("tissue_params", FAST)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 8)
    return embed(path, encoder, kw.pop("spec", SPEC), out, **kw)


def test_embed_writes_complete_trident_store(sample_path, encoder, tmp_path):
    records = list(embed_slide(sample_path, encoder, SPEC, tmp_path, tissue_params=FAST,
                               batch_size=16, num_workers=0))
    path = records[-1].path
    assert path == store_path(tmp_path, "tiny-test", "CMU-1-Small-Region", TILING)
    assert path.parent.parent.name == "0.5mpp_224px_0px_overlap"
    assert [r.status for r in records][:1] == ["started"] and records[-1].status == "done"
    running = [r for r in records if r.status == "running"]
    total = records[0].total
    assert [r.done for r in running] == list(range(16, total, 16)) + [total]
    assert all(r.rate > 0 for r in running) and running[-1].eta_s == 0
    store = open_store(path)
    assert store.features.shape == (total, 48) and np.isfinite(store.features).all()
    assert store.recipe.mpp == pytest.approx(0.499) and store.recipe.mpp_source == "file"
    assert store.recipe.patch_size_level0 == 224 and store.recipe.input_size == 56
    assert store.recipe.weights_sha256 == "random-init-seed-0"
    with h5py.File(path, "r") as f:
        assert f["coords"].attrs["level0_magnification"] == pytest.approx(10 / 0.499)
        assert f["coords"].attrs["patch_size"] == 224


def test_resume_after_crash_gives_identical_features(sample_path, encoder, tmp_path):
    ref = open_store(run(sample_path, encoder, tmp_path / "ref")).features

    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="injected"):
        run(sample_path, FailingEncoder(encoder, fail_after=3), out)
    final = store_path(out, "tiny-test", "CMU-1-Small-Region", TILING)
    assert not final.exists()
    with h5py.File(partial_path(final), "r") as f:
        assert f.attrs["gpfm_n_done"] == 24 and not f.attrs["gpfm_complete"]
    with pytest.raises(IncompleteStoreError):
        open_store(final)

    records = list(embed_slide(sample_path, encoder, SPEC, out, tissue_params=FAST,
                               batch_size=8, num_workers=0))
    assert records[0].status == "started" and records[0].done == 24
    assert len([r for r in records if r.status == "running"]) == len(ref) // 8 - 3 + 1
    resumed = open_store(records[-1].path).features
    np.testing.assert_array_equal(resumed, ref)


def test_closing_the_generator_cancels_and_leaves_resumable_store(sample_path, encoder, tmp_path):
    gen = embed_slide(sample_path, encoder, SPEC, tmp_path, tissue_params=FAST,
                      batch_size=8, num_workers=2)
    for rec in gen:
        if rec.status == "running" and rec.done >= 16:
            break
    gen.close()
    final = rec.path
    with h5py.File(partial_path(final), "r") as f:
        assert f.attrs["gpfm_n_done"] == 16
    ref = open_store(run(sample_path, encoder, tmp_path / "ref")).features
    np.testing.assert_array_equal(open_store(run(sample_path, encoder, tmp_path)).features, ref)


def test_finished_store_skipped_unless_overwrite(sample_path, encoder, tmp_path):
    path = run(sample_path, encoder, tmp_path)
    with h5py.File(path, "a") as f:
        f.attrs["test_marker"] = 123  # survives a skip, not an overwrite
    records = list(embed_slide(sample_path, encoder, SPEC, tmp_path, tissue_params=FAST,
                               num_workers=0))
    assert [r.status for r in records] == ["skipped"]
    assert open_store(path).attrs["test_marker"] == 123
    run(sample_path, encoder, tmp_path, overwrite=True)
    assert "test_marker" not in open_store(path).attrs


def test_other_recipe_on_existing_store_refused(sample_path, encoder, tmp_path):
    run(sample_path, encoder, tmp_path)
    with pytest.raises(RecipeMismatchError, match="min_tissue"):
        run(sample_path, encoder, tmp_path, spec=SPEC.replace(min_tissue=0.9))
    path = run(sample_path, encoder, tmp_path, spec=SPEC.replace(min_tissue=0.9), overwrite=True)
    assert open_store(path).recipe.min_tissue == 0.9


def test_blank_slide_raises_no_tissue_and_writes_nothing(white_tiff, encoder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NoTissueError) as e:
        run(white_tiff, encoder, out)
    msg = str(e.value)
    assert "blank.tif" in msg and "TissueParams(" in msg and "min_saturation" in msg
    assert not list(out.rglob("*.h5*")), "a store was written for a slide without tissue"


def test_min_tissue_too_high_for_any_patch_is_no_tissue(sample_path, encoder, tmp_path):
    spec = GridSpec(target_mpp=4.0, patch_size=224, min_tissue=1.0)  # 1796 px level-0 patches
    with pytest.raises(NoTissueError, match="min_tissue=1.0"):
        run(sample_path, encoder, tmp_path, spec=spec)


def test_missing_mpp_refused_then_override(nompp_tiff, encoder, tmp_path):
    with pytest.raises(MissingMppError, match="nompp.tif.*--mpp"):
        run(nompp_tiff, encoder, tmp_path)
    assert not list(tmp_path.rglob("*.h5*"))
    path = run(nompp_tiff, encoder, tmp_path, mpp=0.25, num_workers=1)
    store = open_store(path)
    assert store.recipe.mpp == 0.25 and store.recipe.mpp_source == "user"
    assert store.patch_size_level0 == 448
    # a Slide object with its own override works the same way
    slide = open_slide(nompp_tiff).with_mpp(0.25)
    assert run(slide, encoder, tmp_path / "obj").name == path.name


def test_40x_preset_reads_128um_field(sample_path, encoder, tmp_path):
    path = run(sample_path, encoder, tmp_path, spec=PRESETS["gpfm-40x-512to224"])
    store = open_store(path)
    # 512 px at 0.25 µm/px = 128 µm = 256.5 level-0 px at 0.499 µm/px
    assert store.patch_size_level0 == round(512 * 0.25 / 0.499)
    assert store.attrs["patch_size"] == 512
    assert store.attrs["target_magnification"] == pytest.approx(40.0)


CHILD = """
import sys, time
from napari_gpfm.encoders import load_encoder
from napari_gpfm.embeddings import embed_slide
from napari_gpfm.tiles import PRESETS, TissueParams
enc = load_encoder("tiny-test", allow_random=True)
inner = enc.embed
def slow_embed(x):
    time.sleep(0.15)
    return inner(x)
enc.embed = slow_embed
for r in embed_slide(sys.argv[1], enc, PRESETS["gpfm-20x-224"], sys.argv[2],
                     tissue_params=TissueParams(thumbnail_max_side=512), batch_size=8,
                     num_workers=1):
    print(r.status, r.done, flush=True)
"""


def test_resume_after_sigkill_gives_identical_features(sample_path, encoder, tmp_path):
    """A process killed with SIGKILL mid-slide leaves a file that resumes exactly."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(sample_path), str(out)],
                             stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            status, done = line.split()
            if status == "running" and int(done) >= 16:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    final = store_path(out, "tiny-test", "CMU-1-Small-Region", TILING)
    assert partial_path(final).exists() and not final.exists()

    records = list(embed_slide(sample_path, encoder, SPEC, out, tissue_params=FAST,
                               batch_size=8, num_workers=0))
    assert records[0].done >= 16  # resumed, not restarted
    ref = open_store(run(sample_path, encoder, tmp_path / "ref")).features
    np.testing.assert_array_equal(open_store(records[-1].path).features, ref)
