"""Feature files written by other tools: TRIDENT's numpy ``.pt``, CLAM h5 without attributes."""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from napari_gpfm.embeddings.store import (
    InferredPatchSizeWarning,
    StoreError,
    open_store,
)

INFERRED = "inferred from the coordinate grid"


def trident_job(tmp_path: Path, n: int = 5) -> tuple[Path, np.ndarray, np.ndarray]:
    """TRIDENT's layout with ``saveas='pt'``: features as a torch.save'd numpy array, coords in
    ``patches/<slide>_patches.h5`` (attrs on the coords dataset)."""
    job = tmp_path / "job" / "20x_256px_0px_overlap"
    (job / "features_uni_v1").mkdir(parents=True)
    (job / "patches").mkdir()
    feats = np.random.rand(n, 8).astype(np.float32)
    coords = np.array([[512 * i, 1024] for i in range(n)], np.int64)
    torch.save(feats, job / "features_uni_v1" / "slide.pt")
    with h5py.File(job / "patches" / "slide_patches.h5", "w") as f:
        d = f.create_dataset("coords", data=coords)
        d.attrs.update(patch_size=256, patch_size_level0=512, level0_magnification=40,
                       target_magnification=20, overlap=0, name="slide")
    return job / "features_uni_v1" / "slide.pt", feats, coords


def test_trident_numpy_pt_opens_with_its_coords(tmp_path):
    path, feats, coords = trident_job(tmp_path)
    before = list(torch.serialization.get_safe_globals())
    store = open_store(path)
    assert store.kind == "trident-pt" and store.is_external
    np.testing.assert_array_equal(store.features, feats)
    np.testing.assert_array_equal(store.coords, coords)
    assert store.patch_size_level0 == 512 and store.patch_size_source == "file"
    assert store.mpp == pytest.approx(0.25)
    # the numpy globals were allowed for that load only
    assert set(torch.serialization.get_safe_globals()) == set(before)  # (a set: no order)
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)


def test_plain_numpy_pt_and_numpy_1_pickles_open(tmp_path):
    path = tmp_path / "features.pt"
    feats = np.random.rand(5, 8).astype(np.float32)
    torch.save(feats, path)
    store = open_store(path)
    np.testing.assert_array_equal(store.features, feats)
    assert store.coords is None and store.patch_size_level0 is None
    # numpy 1.x names its reconstructor numpy.core.multiarray: the same file as numpy 1 writes it
    old = tmp_path / "numpy1.pt"
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)
    old.write_bytes(buf.getvalue())
    np.testing.assert_array_equal(open_store(old).features, feats)
    torch.save(feats.astype(np.float64), path)
    assert open_store(path).features.dtype == np.float32


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Open:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", ["system", "object-array", "open-in-dict", "int-array"])
def test_malicious_pickles_are_refused_and_never_run(tmp_path, payload):
    marker = tmp_path / "pwned"
    obj = {
        "system": lambda: _System(marker),
        "object-array": lambda: np.array([_System(marker), 1.0], dtype=object),
        "open-in-dict": lambda: {"features": _Open(marker)},
        "int-array": lambda: np.arange(6).reshape(2, 3),
    }[payload]()
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    with pytest.raises(StoreError, match=r"evil\.pt: refused by the safe loader: the file needs"):
        open_store(path)
    assert not marker.exists()
    if payload != "int-array":  # the payload is live: an unsafe load would have run it
        torch.load(path, weights_only=False)
        assert marker.exists()


def clam_h5(path: Path, coords: np.ndarray, attrs: dict | None = None) -> Path:
    """A CLAM ``h5_files`` file as extract_features_fp writes it: features and coords, no attrs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["features"] = np.random.rand(len(coords), 16).astype(np.float32)
        c = f.create_dataset("coords", data=np.asarray(coords, np.int32))
        c.attrs.update(attrs or {})
    return path


def tissue_grid(step: int = 256) -> np.ndarray:
    """Patches on a 256-px grid with gaps (a tissue shape, not a full rectangle)."""
    yy, xx = np.mgrid[0:12, 0:15]
    keep = (xx - 7) ** 2 / 49 + (yy - 6) ** 2 / 30 <= 1
    keep[5, 3:6] = False  # a hole
    return np.stack([xx[keep] * step + 1000, yy[keep] * step + 3000], 1)


def test_clam_h5_patch_size_is_inferred_and_stated(tmp_path):
    path = clam_h5(tmp_path / "h5_files" / "slide_B.h5", tissue_grid())
    with pytest.warns(InferredPatchSizeWarning, match=r"slide_B\.h5.*inferred 256 px"):
        store = open_store(path)
    assert store.kind == "clam" and store.patch_size_level0 == 256
    assert store.patch_size_source == INFERRED == "inferred from the coordinate grid"
    assert "patch_size_level0" not in store.attrs  # the file's attrs stay what the file says


def test_clam_pt_takes_the_patch_size_of_its_h5(tmp_path):
    coords = tissue_grid()
    clam_h5(tmp_path / "h5_files" / "slide_C.h5", coords)
    (tmp_path / "pt_files").mkdir()
    torch.save(torch.rand(len(coords), 16), tmp_path / "pt_files" / "slide_C.pt")
    with pytest.warns(InferredPatchSizeWarning, match=r"slide_C\.pt.*inferred 256 px"):
        store = open_store(tmp_path / "pt_files" / "slide_C.pt")
    assert store.kind == "clam-pt" and store.patch_size_level0 == 256


def test_patch_size_from_the_caller(tmp_path):
    path = clam_h5(tmp_path / "h5_files" / "slide_D.h5", tissue_grid())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing inferred, nothing to say
        store = open_store(path, patch_size_level0=512)
    assert store.patch_size_level0 == 512 and store.patch_size_source == "user"
    recorded = clam_h5(tmp_path / "t" / "slide_E.h5", tissue_grid(), {"patch_size_level0": 256})
    assert open_store(recorded, patch_size_level0=256).patch_size_source == "file"
    with pytest.raises(StoreError, match=r"slide_E\.h5: records patch_size_level0 = 256 px but "
                                         r"512 px was given"):
        open_store(recorded, patch_size_level0=512)


def test_one_column_uses_the_other_axis(tmp_path):
    path = clam_h5(tmp_path / "h5_files" / "col.h5", [[0, 0], [0, 224], [0, 672]])
    with pytest.warns(InferredPatchSizeWarning, match="inferred 224 px"):
        assert open_store(path).patch_size_level0 == 224


@pytest.mark.parametrize(("coords", "problem"), [
    ([[256, 512]], "only one patch"),
    ([[0, 0], [0, 0]], "only one patch"),
    ([[0, 0], [256, 0], [0, 512], [256, 512]], "x stride of 256 px but a y stride of 512 px"),
])
def test_uninferable_patch_size_is_refused_clearly(tmp_path, coords, problem):
    path = clam_h5(tmp_path / "h5_files" / "odd.h5", coords)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing inferred
        store = open_store(path)  # its features stay readable
    assert store.features.shape == (len(coords), 16) and store.patch_size_source is None
    with pytest.raises(StoreError, match=rf"odd\.h5: records no patch_size_level0 .*{problem}.*"
                                         r"patch_size_level0=\.\.\."):
        store.patch_size_level0
    assert open_store(path, patch_size_level0=256).patch_size_level0 == 256
