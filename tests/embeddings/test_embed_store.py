"""Feature files: TRIDENT layout, every attribute, refusals, and other tools' files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from napari_gpfm.embeddings import (
    EmbeddingRecipe,
    ExternalFeaturesWarning,
    IncompleteStoreError,
    RecipeMismatchError,
    StoreError,
    StoreWriter,
    open_store,
    partial_path,
    store_path,
    tiling_dir_name,
)
from napari_gpfm.tiles import TissueParams

TILING = tiling_dir_name(0.5, 224, 0)


def recipe(**kw) -> EmbeddingRecipe:
    base = dict(model="tiny-test", weights_sha256=None, mpp=0.25, mpp_source="user",
                target_mpp=0.5, patch_size=224, input_size=56, patch_size_level0=448, overlap=0,
                min_tissue=0.5, tissue_params=TissueParams().to_dict(),
                versions={"napari_gpfm": "0.1.0"})
    base.update(kw)
    return EmbeddingRecipe(**base)


def write_store(out, n=10, d=4, chunks=(4, 4, 2), finish=True, r=None):
    r = r or recipe()
    coords = np.stack([np.arange(n) * 448, np.zeros(n)], 1).astype(np.int64)
    final = store_path(out, r.model, "slide-1", TILING)
    w = StoreWriter.create(final, recipe=r, coords=coords, embed_dim=d, slide_name="slide-1",
                           level0_width=5000, level0_height=900,
                           tissue_fraction=np.linspace(0.5, 1, n))
    feats = np.arange(n * d, dtype=np.float32).reshape(n, d)
    start = 0
    for c in chunks:
        w.write(feats[start:start + c])
        start += c
    if finish:
        return w.finish(), feats, coords
    w.close()
    return final, feats, coords


def test_layout_and_every_attr(tmp_path):
    path, feats, coords = write_store(tmp_path)
    assert path == tmp_path / "0.5mpp_224px_0px_overlap" / "features_tiny-test" / "slide-1.h5"
    assert not partial_path(path).exists()
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (10, 4)
        np.testing.assert_array_equal(f["features"][()], feats)
        assert f["features"].attrs["encoder"] == "tiny-test"
        assert f["features"].attrs["name"] == "slide-1"
        assert f["coords"].dtype == np.int64
        np.testing.assert_array_equal(f["coords"][()], coords)
        trident = {"patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40.0,
                   "target_magnification": 20.0, "overlap": 0, "name": "slide-1",
                   "level0_width": 5000, "level0_height": 900}
        for k, v in trident.items():
            assert f["coords"].attrs[k] == v, k  # where TRIDENT reads them
            assert f.attrs[k] == v, k
        a = f.attrs
        assert a["gpfm_model"] == "tiny-test"
        assert a["gpfm_weights_sha256"] == ""
        assert a["gpfm_mpp"] == 0.25 and a["gpfm_mpp_source"] == "user"
        assert a["gpfm_target_mpp"] == 0.5 and a["gpfm_input_size"] == 56
        assert EmbeddingRecipe.from_json(a["gpfm_recipe"]) == recipe()
        assert a["gpfm_recipe_key"] == recipe().key()
        assert json.loads(a["gpfm_tissue_params"]) == TissueParams().to_dict()
        assert a["gpfm_version"] == "0.1.0"
        assert a["gpfm_n_total"] == 10 and a["gpfm_n_done"] == 10
        assert bool(a["gpfm_complete"]) is True
        assert f["tissue_fraction"].shape == (10,)
    store = open_store(path, expected_recipe=recipe())
    assert store.kind == "gpfm" and not store.is_external
    np.testing.assert_array_equal(store.features, feats)
    assert store.recipe == recipe() and store.patch_size_level0 == 448 and store.mpp == 0.25


def test_incomplete_store_refused_naming_file_and_progress(tmp_path):
    final, _, _ = write_store(tmp_path, chunks=(4,), finish=False)
    part = partial_path(final)
    assert part.exists() and not final.exists()
    with pytest.raises(IncompleteStoreError, match=r"slide-1\.h5.*resume"):
        open_store(final)
    with pytest.raises(IncompleteStoreError, match=r"4 of 10"):
        open_store(part)


def test_recipe_mismatch_refused_showing_fields(tmp_path):
    path, _, _ = write_store(tmp_path)
    with pytest.raises(RecipeMismatchError) as e:
        open_store(path, expected_recipe=recipe(target_mpp=0.25, min_tissue=0.1))
    msg = str(e.value)
    assert "slide-1.h5" in msg and "target_mpp" in msg and "min_tissue" in msg
    assert "patch_size" not in e.value.diff
    assert set(e.value.diff) == {"target_mpp", "min_tissue"}


def test_writer_resume_continues_and_refuses_other_recipe(tmp_path):
    final, feats, coords = write_store(tmp_path, chunks=(4,), finish=False)
    assert StoreWriter.resume(final, recipe=recipe(overlap=16), coords=coords, embed_dim=4) is None
    assert StoreWriter.resume(final, recipe=recipe(), coords=coords[:5], embed_dim=4) is None
    w = StoreWriter.resume(final, recipe=recipe(), coords=coords, embed_dim=4)
    assert w is not None and w.n_done == 4
    w.write(feats[4:])
    path = w.finish()
    np.testing.assert_array_equal(open_store(path).features, feats)


def test_finish_refuses_unfinished_writer(tmp_path):
    final, _, coords = write_store(tmp_path, chunks=(4,), finish=False)
    w = StoreWriter.resume(final, recipe=recipe(), coords=coords, embed_dim=4)
    with pytest.raises(IncompleteStoreError, match="4 of 10"):
        w.finish()
    w.close()


def test_corrupt_partial_is_not_resumed(tmp_path):
    final, _, coords = write_store(tmp_path, chunks=(4,), finish=False)
    partial_path(final).write_bytes(b"garbage")
    assert StoreWriter.resume(final, recipe=recipe(), coords=coords, embed_dim=4) is None


def test_trident_file_read_as_external(tmp_path):
    p = tmp_path / "features_uni_v1" / "TCGA-1.h5"
    p.parent.mkdir()
    feats = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    coords = np.arange(12, dtype=np.int64).reshape(6, 2) * 256
    with h5py.File(p, "w") as f:
        fd = f.create_dataset("features", data=feats)
        fd.attrs["encoder"] = "uni_v1"
        fd.attrs["name"] = "TCGA-1"
        cd = f.create_dataset("coords", data=coords)
        cd.attrs.update(patch_size=256, patch_size_level0=512, level0_magnification=40,
                        target_magnification=20, overlap=0, name="TCGA-1",
                        level0_width=9000, level0_height=8000)
    store = open_store(p)
    assert store.kind == "trident" and store.is_external and store.recipe is None
    assert store.model == "uni_v1" and store.patch_size_level0 == 512
    assert store.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(store.features, feats)
    np.testing.assert_array_equal(store.coords, coords)
    assert "recipe unknown" in store.describe()
    with pytest.warns(ExternalFeaturesWarning, match="TCGA-1.h5"):
        open_store(p, expected_recipe=recipe())


def test_clam_h5_and_pt_files_read(tmp_path):
    h5_dir, pt_dir = tmp_path / "h5_files", tmp_path / "pt_files"
    h5_dir.mkdir(), pt_dir.mkdir()
    feats = np.random.default_rng(1).normal(size=(5, 1024)).astype(np.float32)
    coords = np.array([[0, 0], [512, 0], [0, 512], [512, 512], [1024, 0]], np.int32)
    with h5py.File(h5_dir / "slide_A.h5", "w") as f:
        f["features"] = feats
        f["coords"] = coords
    torch.save(torch.from_numpy(feats), pt_dir / "slide_A.pt")
    h5 = open_store(h5_dir / "slide_A.h5")
    assert h5.kind == "clam" and h5.is_external and h5.coords.dtype == np.int64
    np.testing.assert_array_equal(h5.coords, coords)
    pt = open_store(pt_dir / "slide_A.pt")
    assert pt.kind == "clam-pt" and pt.is_external
    np.testing.assert_array_equal(pt.features, feats)
    np.testing.assert_array_equal(pt.coords, coords)  # found via ../h5_files/
    (pt_dir / "lonely.pt").write_bytes((pt_dir / "slide_A.pt").read_bytes())
    assert open_store(pt_dir / "lonely.pt").coords is None


def test_unreadable_files_named(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("not hdf5")
    with pytest.raises(StoreError, match="x.h5"):
        open_store(bad)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(StoreError, match="y.h5.*no 'features'"):
        open_store(tmp_path / "y.h5")
    with pytest.raises(StoreError, match="no such feature file"):
        open_store(tmp_path / "missing.h5")
