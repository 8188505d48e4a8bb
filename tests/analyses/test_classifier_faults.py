"""Classifiers and their outputs: nothing lost, nothing silently wrong (issue 16, items 1, 2, 4).

- A full disk or an I/O error while writing a slide's outputs (GeoJSON, per-patch CSV and HDF5)
  or a classifier file is one named ``OutputWriteError``; the previous outputs are untouched (a
  slide's outputs are renamed all together, only once all are whole) and no temporary file is
  left; on a real full tmpfs, in a subprocess, nothing crashes.
- NaN features are refused naming the store (their probabilities would be NaN).
- A feature file of another tool that records no model is refused for a classifier of a model
  unless ``--assume-model`` / ``assume_model=`` says which (then a warning).
- A classifier whose header (recipe) was edited is refused: its sha256 covers header and arrays.
"""

from __future__ import annotations

import argparse
import errno
import gc
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import napari_gpfm.analyses.export as export_mod
import napari_gpfm.analyses.probe as probe_mod
import napari_gpfm.embeddings.store as store_mod
from napari_gpfm.analyses.classifier import Prediction
from napari_gpfm.analyses.classify import UnknownFeatureModelError, train_probe, write_outputs
from napari_gpfm.analyses.probe import (
    ProbeFileError,
    ProbeFormatWarning,
    RecipeMismatchError,
    fit_probe,
    load_probe,
)
from napari_gpfm.annotations.geojson import Annotation
from napari_gpfm.embeddings import (
    ExternalFeaturesWarning,
    NonFiniteFeaturesError,
    OutputWriteError,
    open_store,
    store_path,
    tiling_dir_name,
)

REPO = Path(__file__).resolve().parents[2]
NAMES = ["Tumor", "Stroma"]
RECIPE = {"model": "uni", "weights_sha256": "ab" * 32, "target_mpp": 0.5, "patch_size": 224}


def synthetic_prediction(n: int = 400, seed: int = 0, name: str = "slide") -> Prediction:
    """A prediction over an n-patch grid (224 px patches), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    ys, xs = np.divmod(np.arange(n, dtype=np.int64), side)
    p1 = rng.random(n).astype(np.float32)
    proba = np.stack([1 - p1, p1], 1)
    patches = SimpleNamespace(coords=np.stack([xs, ys], 1) * 224, patch_size_level0=224,
                              mpp=0.5, slide_name=name)
    return Prediction.from_proba(proba, NAMES, patches, recipe=RECIPE,
                                 colours=np.array([[200, 0, 0], [0, 150, 0]], float))


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class FullDiskFile(io.RawIOBase):
    """A file whose writes fail with ``err`` once ``limit`` bytes were written (a disk filling
    up part-way through a file)."""

    def __init__(self, path, mode, limit, err=errno.ENOSPC, **kwargs):
        self.inner = open(path, mode.replace("t", "") if "b" in mode else mode, **kwargs)
        self.limit, self.err, self.written = limit, err, 0

    def write(self, data):
        if self.written + len(data) > self.limit:
            take = max(0, self.limit - self.written)
            self.inner.write(data[:take])
            self.written += take
            raise OSError(self.err, os.strerror(self.err))
        self.written += len(data)
        return self.inner.write(data)

    def writable(self):
        return True

    def close(self):
        self.inner.close()
        super().close()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def faulty_open(limit, err=errno.ENOSPC):
    def opener(path, mode="r", *args, **kwargs):
        if "w" in mode:
            return FullDiskFile(path, mode, limit, err, *args, **kwargs)
        return open(path, mode, *args, **kwargs)

    return opener


# --------------------------------------------------------------------------------------------
# 1. Disk full while writing outputs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def previous(tmp_path):
    """Outputs of an earlier run in ``out`` (what a failed run must leave untouched)."""
    out = tmp_path / "out"
    write_outputs(synthetic_prediction(seed=1), out)
    return out, outputs(out)


def test_csv_cut_by_a_full_disk_leaves_the_previous_outputs(previous, monkeypatch):
    out, before = previous
    monkeypatch.setattr(export_mod, "open", faulty_open(limit=4000), raising=False)
    with pytest.raises(OutputWriteError) as e:
        write_outputs(synthetic_prediction(seed=2), out)
    msg = str(e.value)
    assert msg.startswith(f"{out / 'slide_patches.csv'}: cannot write: no space left on device "
                          "(ENOSPC)"), msg  # fmt: skip
    assert "previous" in msg and "untouched" in msg
    assert outputs(out) == before  # no cut CSV, no new GeoJSON beside an old CSV, no temp files


def test_geojson_write_error_is_named_and_changes_nothing(previous, monkeypatch):
    import napari_gpfm.annotations.geojson as geojson_mod

    out, before = previous
    monkeypatch.setattr(geojson_mod, "open", faulty_open(limit=100, err=errno.EIO),
                        raising=False)  # fmt: skip
    with pytest.raises(OutputWriteError, match=r"slide\.geojson: cannot write: input/output "
                                               r"error \(EIO\)"):  # fmt: skip
        write_outputs(synthetic_prediction(seed=2), out)
    assert outputs(out) == before


def test_per_patch_h5_on_a_full_disk_is_named_and_changes_nothing(previous, monkeypatch):
    out, before = previous
    real, seen = store_mod._pwrite, [0]

    def full(fd, data, offset):
        seen[0] += 1
        if seen[0] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(store_mod, "_pwrite", full)
    with pytest.raises(OutputWriteError, match=r"slide_patches\.h5: cannot write: no space left "
                                               r"on device \(ENOSPC\)"):  # fmt: skip
        write_outputs(synthetic_prediction(seed=2), out)
    gc.collect()
    assert outputs(out) == before


def test_outputs_are_renamed_only_once_all_are_on_disk(previous, monkeypatch):
    out, before = previous

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)  # the GeoJSON and CSV are written, not yet on disk
    with pytest.raises(OutputWriteError, match=r"slide\.geojson: cannot write: input/output "
                                               r"error \(EIO\)"):  # fmt: skip
        write_outputs(synthetic_prediction(seed=2), out)
    assert outputs(out) == before
    monkeypatch.undo()
    paths = write_outputs(synthetic_prediction(seed=2), out)
    assert set(paths) == {"geojson", "csv", "h5"} and outputs(out) != before
    import pandas as pd

    assert len(pd.read_csv(paths["csv"])) == 400


def test_classifier_save_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    y = np.repeat([0, 1], 20)
    path = tmp_path / "clf.npz"
    fit_probe(x, y, NAMES, recipe=RECIPE).save(path)
    before = path.read_bytes()
    monkeypatch.setattr(probe_mod, "open", faulty_open(limit=500), raising=False)
    with pytest.raises(OutputWriteError) as e:
        fit_probe(x[::-1], y, NAMES, recipe=RECIPE).save(path)
    assert str(e.value).startswith(f"{path}: cannot write: no space left on device (ENOSPC)")
    assert "the previous clf.npz is untouched" in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["clf.npz"]


def test_outputs_on_a_full_tmpfs_in_a_subprocess(tiny_disk):
    """A real full disk: each output that does not fit is one named error, the previous outputs
    stay byte for byte, no temporary file is left, the process does not crash (it used to
    segfault on the per-patch HDF5, or leave a CSV cut at a whole row)."""
    out = tiny_disk / "out"
    write_outputs(synthetic_prediction(seed=1), out)
    before = outputs(out)
    st = os.statvfs(tiny_disk)
    script = textwrap.dedent(f"""
        import gc, os, sys
        from test_classifier_faults import synthetic_prediction
        from napari_gpfm.analyses.classify import write_outputs
        from napari_gpfm.errors import OutputWriteError
        with open({str(tiny_disk / "filler")!r}, "wb") as fh:   # leave {{leave}} bytes free
            fh.write(b"\\0" * max(0, {st.f_bavail * st.f_frsize} - int(sys.argv[1])))
        try:
            write_outputs(synthetic_prediction(n=5000, seed=2), {str(out)!r})
        except OutputWriteError as e:
            print("caught:", e)
        gc.collect()
        print("survived")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                       str(Path(__file__).parent)]))
    failed = set()
    for leave in (64 * 1024, 250 * 1024, 600 * 1024):  # fails in the GeoJSON, CSV or HDF5
        (tiny_disk / "filler").unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script, str(leave)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "Fatal Python error" not in proc.stderr, (
            f"crashed (exit {proc.returncode}) with {leave} bytes free:\n{proc.stderr[-3000:]}")
        assert "caught:" in proc.stdout and "cannot write: no space left on device (ENOSPC)" in \
            proc.stdout, proc.stdout + proc.stderr  # fmt: skip
        assert proc.stdout.rstrip().endswith("survived")
        assert outputs(out) == before, f"previous outputs changed with {leave} bytes free"
        failed.add(proc.stdout.split("caught: ")[1].split(":")[0])
    assert failed == {str(out / n) for n in ("slide.geojson", "slide_patches.csv",
                                             "slide_patches.h5")}, failed  # fmt: skip


# --------------------------------------------------------------------------------------------
# 2. NaN features, 4. foreign features and edited classifiers
# --------------------------------------------------------------------------------------------


def foreign_h5(path: Path, feats: np.ndarray, encoder: str | None = None) -> Path:
    """A TRIDENT-style feature file of another tool (no napari-gpfm recipe)."""
    n = len(feats)
    side = int(np.ceil(np.sqrt(n)))
    ys, xs = np.divmod(np.arange(n, dtype=np.int64), side)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", data=feats.astype(np.float32))
        if encoder:
            ds.attrs["encoder"] = encoder
        c = f.create_dataset("coords", data=np.stack([xs, ys], 1) * 224)
        c.attrs["patch_size_level0"] = 224
    return path


@pytest.fixture
def probe192():
    x = np.random.default_rng(0).standard_normal((60, 192)).astype(np.float32)
    x[30:] += 1.0
    return fit_probe(x, np.repeat([0, 1], 30), NAMES, recipe=RECIPE)


def test_nan_features_are_refused_naming_the_store(tmp_path, probe192):
    feats = np.random.default_rng(1).standard_normal((50, 192)).astype(np.float32)
    feats[[3, 7, 9], 5] = np.nan
    feats[11, 0] = np.inf
    store = open_store(foreign_h5(tmp_path / "nan.h5", feats, encoder="uni"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExternalFeaturesWarning)
        with pytest.raises(NonFiniteFeaturesError) as e:
            probe192.predict_store(store)
    assert str(e.value).startswith(f"{store.path}: 4 of 50 patches have non-finite features")
    assert e.value.rows == 4
    ann = [Annotation([[np.array([[0, 0], [2000, 0], [2000, 2000], [0, 2000], [0, 0]], float)]],
                      class_name="Tumor")]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExternalFeaturesWarning)
        with pytest.raises(NonFiniteFeaturesError, match="nan.h5"):
            train_probe(ann, store, NAMES, cv_folds=0)


def test_foreign_features_without_a_model_need_assume_model(tmp_path, probe192):
    feats = np.random.default_rng(2).standard_normal((50, 192)).astype(np.float32)
    store = open_store(foreign_h5(tmp_path / "random192.h5", feats))  # no 'encoder' attribute
    with pytest.raises(UnknownFeatureModelError) as e:
        probe192.predict_store(store)
    msg = str(e.value)
    assert msg.startswith(f"{store.path}: records no model") and "--assume-model NAME" in msg
    with pytest.warns(ExternalFeaturesWarning, match="assuming the features were made by 'uni'"):
        pred = probe192.predict_store(store, assume_model="uni")
    assert np.isfinite(pred.proba).all() and pred.proba.shape == (50, 2)
    with pytest.warns(ExternalFeaturesWarning), pytest.raises(RecipeMismatchError, match="model"):
        probe192.predict_store(store, assume_model="gpfm")  # assumed, and checked
    # a file that records its encoder: checked by name, with a warning for what cannot be
    named = open_store(foreign_h5(tmp_path / "uni.h5", feats, encoder="uni"))
    with pytest.warns(ExternalFeaturesWarning, match="weights and tiling"):
        probe192.predict_store(named)


def _cli(argv):
    from napari_gpfm.jobs._classify_cli import register

    parser = argparse.ArgumentParser(prog="napari-gpfm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_classify_refuses_foreign_features_unless_assume_model(tmp_path, probe192,
                                                                   sample_svs, capsys):
    clf = Path(probe192.save(tmp_path / "clf.npz"))
    store_dir = tmp_path / "stores"
    tiling = tiling_dir_name(0.5, 224, 0)
    feats = np.random.default_rng(3).standard_normal((50, 192)).astype(np.float32)
    foreign_h5(store_path(store_dir, "uni", sample_svs.stem, tiling), feats)
    out = tmp_path / "res"
    argv = ["classify", "--classifier", str(clf), str(sample_svs), "--out", str(out),
            "--store-dir", str(store_dir)]  # fmt: skip
    assert _cli(argv) == 1
    err = capsys.readouterr().err
    assert "records no model" in err and "--assume-model NAME" in err
    assert not out.exists() or not list(out.iterdir())
    assert _cli([*argv, "--assume-model", "uni"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "assuming the features were made by 'uni'" in err
    assert (out / f"{sample_svs.stem}_patches.csv").exists()


def edit_header(path: Path, **recipe) -> None:
    """Change the classifier's recipe in its header, leaving its sha256 as it was."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays["header"]))
    header["recipe"].update(recipe)
    arrays["header"] = np.asarray(json.dumps(header))
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def test_a_classifier_with_an_edited_header_is_refused(tmp_path, probe192):
    path = Path(probe192.save(tmp_path / "clf.npz"))
    edit_header(path, patch_size=112)  # 224 → 112
    with pytest.raises(ProbeFileError, match="header .* do not match their sha256"):
        load_probe(path)


def test_a_classifier_with_an_edited_header_fails_the_command(tmp_path, probe192, sample_svs,
                                                              capsys):
    from napari_gpfm.cli import main

    path = Path(probe192.save(tmp_path / "clf.npz"))
    edit_header(path, patch_size=112)
    assert main(["classify", "--classifier", str(path), str(sample_svs), "--out",
                 str(tmp_path / "res")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: the probe's header (recipe, format) and arrays do "
                          "not match their sha256")  # fmt: skip


def test_older_classifier_files_load_with_a_warning(tmp_path, probe192):
    path = Path(probe192.save(tmp_path / "clf.npz"))
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays.pop("header")))
    header["format"] = "napari-gpfm-linear-probe/1"  # what files of the first format hold
    header["sha256"] = probe_mod.LinearProbe._digest(arrays)
    with open(path, "wb") as fh:
        np.savez(fh, header=np.asarray(json.dumps(header)), **arrays)
    with pytest.warns(ProbeFormatWarning, match="Load and save it again"):
        loaded = load_probe(path)
    assert loaded.recipe == RECIPE
