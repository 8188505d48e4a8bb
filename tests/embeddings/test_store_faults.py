"""Nothing lost, nothing silently wrong (issue 16, items 1, 2, 4, 5) for feature stores and the
``embed`` command: a full disk or an I/O error is one named error (never a crash) and the batch
goes on; NaN features are never marked complete; damaged or edited stores are refused naming
the store and what is damaged; a slide replaced between a kill and the resume, or after
finishing, is refused naming both files.

Disk full is tested twice: with a fault-injecting write (``store._pwrite``, the OS call every
store write goes through) at chosen points, and on a real 1 MiB tmpfs (root only; skipped
elsewhere). Runs that used to crash the process (exit 139) run in a subprocess, so a crash fails
the test instead of killing pytest.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from embed_helpers import NaNEncoder, flip_byte, strip_integrity
from synthetic_slides import write_tiff

import napari_gpfm.embeddings.run as run_mod
import napari_gpfm.embeddings.store as store_mod
import napari_gpfm.jobs.embed as embed_job
from napari_gpfm.embeddings import (
    DamagedStoreError,
    NonFiniteFeaturesError,
    OutputWriteError,
    SlideMismatchError,
    StoreWriter,
    embed,
    make_recipe,
    open_store,
    partial_path,
    recipe_store_path,
    store_path,
    tiling_dir_name,
)
from napari_gpfm.jobs._cli import main as embed_main
from napari_gpfm.slide import open_slide
from napari_gpfm.tiles import GridSpec, TissueParams

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny-test"
FAST = TissueParams(thumbnail_max_side=512)
SPEC = GridSpec(target_mpp=1.0, patch_size=224, min_tissue=0.3)
ROW_BYTES = 48 * 4  # one patch of the tiny model's features
# every position of the 2 x 2 grid, whatever the tissue detector makes of the crop's edges
QUICK = ["--model", TINY, "--allow-random-weights", "--num-workers", "0", "--batch-size", "1",
         "--target-mpp", "1.0", "--tissue-method", "none"]  # fmt: skip
TILING = tiling_dir_name(1.0, 224)


@pytest.fixture(autouse=True)
def fresh_encoders(monkeypatch):
    monkeypatch.setattr(embed_job, "_ENCODERS", {})


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """A 1200 px tissue crop of the sample slide: 4 patches of 224 px at 1 µm/px."""
    from embed_helpers import SAMPLE

    return open_slide(SAMPLE).read_region(600, 1000, 0, 1200, 1200)


def api(path, encoder, out, **kw):
    kw.setdefault("tissue_params", FAST)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 1)
    return embed(path, encoder, SPEC, out, **kw)


def final_for(encoder, tif, out):
    return recipe_store_path(out, make_recipe(encoder, open_slide(tif), SPEC, FAST), tif.stem)


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), os.stat(path).st_mtime_ns


def run_child(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """A Python child (``-X faulthandler``: a crash prints where) in the repository."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                       str(REPO / "tests" / "embeddings")]))
    return subprocess.run([sys.executable, "-X", "faulthandler", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def assert_no_crash(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode >= 0 and proc.returncode not in (134, 139), (
        f"the process crashed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    assert "Segmentation fault" not in proc.stderr and "Fatal Python error" not in proc.stderr


# --------------------------------------------------------------------------------------------
# 1. Disk full / I/O errors
# --------------------------------------------------------------------------------------------


class FaultyDisk:
    """``store._pwrite`` failing with ``err`` at the chosen write: ``when(size, offset, seen)``,
    ``seen`` counting earlier writes by size (``seen[ROW_BYTES]``: feature chunks so far)."""

    def __init__(self, monkeypatch, when, err=errno.ENOSPC):
        self.real, self.when, self.err, self.seen, self.fired = store_mod._pwrite, when, err, {}, 0
        monkeypatch.setattr(store_mod, "_pwrite", self)

    def __call__(self, fd, data, offset):
        size = len(data)
        if self.when(size, offset, self.seen):
            self.fired += 1
            raise OSError(self.err, os.strerror(self.err))
        self.seen[size] = self.seen.get(size, 0) + 1
        return self.real(fd, data, offset)


FAULTS = {
    # the 2nd chunk of features (raw data)
    "features": lambda size, off, seen: size == ROW_BYTES and seen.get(ROW_BYTES, 0) == 1,
    # the checksum rows of the 3rd chunk (metadata flushed with it)
    "checksums": lambda size, off, seen: size == 5120 and seen.get(5120, 0) == 2,
    # HDF5's last superblock write while it closes the finished file (the write that used to
    # leave HDF5 half closed and crash the process at garbage collection)
    "closing": lambda size, off, seen: off == 0 and seen.get(ROW_BYTES, 0) == 4,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, crop, tiny_models_dir_module):
    from napari_gpfm.encoders import load_encoder

    enc = load_encoder(TINY, allow_random=True)
    d = tmp_path_factory.mktemp("ref")
    tif = write_tiff(d / "A.tif", crop)
    return open_store(api(tif, enc, d / "out")).features


@pytest.fixture(scope="module")
def tiny_models_dir_module(tmp_path_factory):
    from embed_helpers import write_card_dir

    d = write_card_dir(tmp_path_factory.getbasetemp() / "models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
        yield d


@pytest.mark.parametrize("where", sorted(FAULTS))
def test_disk_full_mid_run_is_one_named_error_and_the_run_resumes(where, tmp_path, crop, encoder,
                                                                  monkeypatch, reference):
    tif = write_tiff(tmp_path / "A.tif", crop)
    out = tmp_path / "out"
    disk = FaultyDisk(monkeypatch, FAULTS[where])
    with pytest.raises(OutputWriteError) as e:
        api(tif, encoder, out)
    assert disk.fired == 1  # one failed write: everything after it was dropped, not retried
    final = final_for(encoder, tif, out)
    part = partial_path(final)
    msg = str(e.value)
    assert msg.startswith(f"{part}: cannot write: no space left on device (ENOSPC)"), msg
    assert "rerun to resume" in msg and e.value.errno == errno.ENOSPC
    assert not final.exists() and part.exists()
    gc.collect()  # nothing half-closed left for the garbage collector to trip on

    monkeypatch.setattr(store_mod, "_pwrite", disk.real)  # space again: resume, same features
    np.testing.assert_array_equal(open_store(api(tif, encoder, out)).features, reference)


def test_fsync_error_at_finish_keeps_the_partial_and_the_previous_store(tmp_path, crop, encoder,
                                                                        monkeypatch, reference):
    tif = write_tiff(tmp_path / "A.tif", crop)
    out = tmp_path / "out"
    final = api(tif, encoder, out)
    before = snapshot(final)

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(store_mod, "_fsync", eio)
    with pytest.raises(OutputWriteError, match=r"cannot write: input/output error \(EIO\)") as e:
        api(tif, encoder, out, overwrite=True)
    assert f"the previous {final.name} is untouched" in str(e.value)
    assert snapshot(final) == before  # the killed --overwrite kept the old store
    assert partial_path(final).exists()
    monkeypatch.undo()
    np.testing.assert_array_equal(open_store(final).features, reference)


def test_no_permission_is_a_named_error(tmp_path, crop, encoder, monkeypatch):
    tif = write_tiff(tmp_path / "A.tif", crop)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(store_mod.GuardedFile, "__init__", denied)
    with pytest.raises(OutputWriteError, match=r"A\.h5\.partial: cannot write: permission "
                                               r"denied \(EACCES\); choose an output folder"):
        api(tif, encoder, tmp_path / "out")


def test_guarded_file_contract(tmp_path, monkeypatch):
    """What keeps HDF5 from a half-closed file: the first failed write raises, later writes are
    dropped, writes while HDF5 closes never raise (recorded instead); writes are complete,
    reads past the end are zeros; a second writer is refused by the lock."""
    path = tmp_path / "g.bin"
    g = store_mod.GuardedFile(path, create=True)
    real, calls = store_mod._pwrite, []

    def short(fd, data, offset):  # the OS may write less than asked
        calls.append(len(data))
        return real(fd, bytes(data)[:3], offset)

    monkeypatch.setattr(store_mod, "_pwrite", short)
    assert g.write(b"0123456789") == 10 and path.read_bytes() == b"0123456789"
    assert calls == [10, 7, 4, 1]
    g.seek(8)
    assert g.read(4) == b"89\0\0"  # past the end: zeros, as HDF5's own driver reads
    with pytest.raises(BlockingIOError):
        store_mod.GuardedFile(path, create=False)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod, "_pwrite", full)
    with g.closing():  # HDF5 closing the file: recorded, not raised
        assert g.write(b"abc") == 3
    assert g.failed is not None and g.failed.errno == errno.ENOSPC
    monkeypatch.setattr(store_mod, "_pwrite", real)
    g.seek(0)
    assert g.write(b"zz") == 2 and g.truncate(1) == 1  # dropped after the failure
    assert path.read_bytes() == b"0123456789"
    g.close()

    g = store_mod.GuardedFile(tmp_path / "h.bin", create=True)
    monkeypatch.setattr(store_mod, "_pwrite", full)
    with pytest.raises(OSError, match="No space left"):  # outside a close: raised
        g.write(b"abc")
    g.close()


def test_batch_goes_on_after_a_disk_error_in_a_subprocess(tmp_path, crop):
    """The CLI with ENOSPC injected into slide A's store: one named error for A, B is embedded,
    exit 1, no crash; A's partial keeps its first chunk and resumes."""
    a, b = write_tiff(tmp_path / "A.tif", crop), write_tiff(tmp_path / "B.tif", crop[:, ::-1])
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import errno, os, sys
        import napari_gpfm.embeddings.store as store
        real, seen = store._pwrite, [0]
        def faulty(fd, data, offset):
            if os.readlink(f"/proc/self/fd/{{fd}}").endswith("A.h5.partial") \\
                    and len(data) == {ROW_BYTES}:
                seen[0] += 1
                if seen[0] == 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data, offset)
        store._pwrite = faulty
        from napari_gpfm.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to tell the stores apart")
    proc = run_child(["-c", script, "embed", str(a), str(b), "--out", str(out), *QUICK])
    assert_no_crash(proc)
    assert proc.returncode == 1, proc.stderr
    part = partial_path(store_path(out, TINY, "A", TILING))
    assert f"FAILED: {a}: {part}: cannot write: no space left on device (ENOSPC)" in proc.stderr
    assert f"done: {b} -> " in proc.stdout, proc.stdout
    assert "1 of 2 slides embedded" in proc.stderr
    with h5py.File(part, "r") as f:
        assert f.attrs["gpfm_n_done"] == 1 and not f.attrs["gpfm_complete"]
    assert embed_main([str(a), "--out", str(out), *QUICK]) == 0  # resumes
    assert np.isfinite(open_store(store_path(out, TINY, "A", TILING)).features).all()


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_full_tmpfs_cli_batch_and_overwrite_in_a_subprocess(tmp_path, tiny_disk, crop):
    """On a real full disk: every slide of the batch is tried, each failure is one named
    ENOSPC error, the killed --overwrite keeps B's finished store, nothing crashes."""
    a, b = write_tiff(tmp_path / "A.tif", crop), write_tiff(tmp_path / "B.tif", crop[:, ::-1])
    out = tiny_disk / "out"
    assert embed_main([str(b), "--out", str(out), *QUICK]) == 0
    b_store = store_path(out, TINY, "B", TILING)
    before = snapshot(b_store)
    fill(tiny_disk, leave=4096)
    proc = run_child(["-m", "napari_gpfm.cli", "embed", str(a), str(b), "--out", str(out),
                      *QUICK, "--overwrite"])  # fmt: skip
    assert_no_crash(proc)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAILED: ")]
    assert len(lines) == 2, proc.stderr  # B was tried after A failed
    for slide, name in ((a, "A"), (b, "B")):
        line = next(ln for ln in lines if ln.startswith(f"FAILED: {slide}: "))
        assert f"{name}.h5.partial: cannot write: no space left on device (ENOSPC)" in line
    assert "the previous B.h5 is untouched" in proc.stderr
    assert snapshot(b_store) == before
    assert np.isfinite(open_store(b_store).features).all()  # still whole and verified
    assert not list(out.rglob("*.partial"))  # creating them failed: nothing half-made left


def test_full_tmpfs_python_api_survives_the_caught_error(tmp_path, tiny_disk, crop):
    """The Python API: the error is caught, garbage collected, the process exits normally (it
    used to segfault after the exception was caught)."""
    tif = write_tiff(tmp_path / "A.tif", crop)
    fill(tiny_disk, leave=12 * 1024)
    script = textwrap.dedent(f"""
        import gc
        from napari_gpfm.embeddings import OutputWriteError, embed
        from napari_gpfm.encoders import load_encoder
        from napari_gpfm.tiles import GridSpec, TissueParams
        enc = load_encoder("{TINY}", allow_random=True)
        try:
            embed({str(tif)!r}, enc, GridSpec(target_mpp=1.0, patch_size=224, min_tissue=0.3),
                  {str(tiny_disk / "out")!r}, tissue_params=TissueParams(thumbnail_max_side=512),
                  num_workers=0, batch_size=1)
        except OutputWriteError as e:
            print("caught:", e)
        del enc
        gc.collect()
        print("survived")
    """)
    proc = run_child(["-c", script])
    assert_no_crash(proc)
    assert proc.returncode == 0, proc.stderr
    assert "caught:" in proc.stdout and "no space left on device (ENOSPC)" in proc.stdout
    assert proc.stdout.rstrip().endswith("survived")


# --------------------------------------------------------------------------------------------
# 2. NaN features
# --------------------------------------------------------------------------------------------


def test_nan_features_are_never_marked_complete(tmp_path, crop, encoder):
    tif = write_tiff(tmp_path / "A.tif", crop)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteFeaturesError) as e:
        api(tif, NaNEncoder(encoder, rows=1), out, batch_size=2)  # 1 NaN row per batch of 2
    final = final_for(encoder, tif, out)
    part = partial_path(final)
    msg = str(e.value)
    assert msg.startswith(f"{part}: 2 of 4 patches have non-finite features (NaN or inf)"), msg
    assert "not marked complete" in msg and "stays for inspection" in msg
    assert e.value.rows == 2 and not final.exists()
    with h5py.File(part, "r") as f:  # kept for inspection, every row written
        assert f.attrs["gpfm_n_done"] == 4 and not f.attrs["gpfm_complete"]
        assert np.isnan(f["features"][()]).any(axis=1).sum() == 2
    with pytest.raises(NonFiniteFeaturesError, match="2 of 4 patches"):  # refused again
        api(tif, encoder, out)
    # overwrite starts afresh (here: a model with finite outputs)
    assert np.isfinite(open_store(api(tif, encoder, out, overwrite=True)).features).all()


def test_nan_features_fail_the_cli_slide_and_the_others_go_on(tmp_path, crop, monkeypatch,
                                                             capsys):
    a, b = write_tiff(tmp_path / "A.tif", crop), write_tiff(tmp_path / "B.tif", crop[:, ::-1])
    forward, patch_dataset, current = run_mod.BatchForward.submit, run_mod.PatchDataset, [None]

    def dataset(path, *args, **kwargs):  # which slide the run is reading
        current[0] = Path(path).stem
        return patch_dataset(path, *args, **kwargs)

    def nan_for_a(*args, **kwargs):
        feats = forward(*args, **kwargs)
        return np.full_like(feats, np.nan) if current[0] == "A" else feats

    monkeypatch.setattr(run_mod, "PatchDataset", dataset)
    monkeypatch.setattr(run_mod.BatchForward, "submit", nan_for_a)
    out = tmp_path / "out"
    assert embed_main([str(a), str(b), "--out", str(out), *QUICK]) == 1
    captured = capsys.readouterr()
    part = partial_path(store_path(out, TINY, "A", TILING))
    line = next(ln for ln in captured.err.splitlines() if ln.startswith("FAILED: "))
    assert f"{part}: " in line and "patches have non-finite features (NaN or inf)" in line, line
    assert f"done: {b} -> " in captured.out
    assert part.exists() and not part.with_suffix("").exists()


# --------------------------------------------------------------------------------------------
# 4. Corrupt and edited stores
# --------------------------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path, crop, encoder):
    tif = write_tiff(tmp_path / "A.tif", crop)
    return api(tif, encoder, tmp_path / "out"), tif


def test_a_flipped_bit_in_the_features_is_refused_on_read(finished):
    path, _ = finished
    good = open_store(path).features.copy()
    flip_byte(path, "features", 2 * ROW_BYTES + 5)  # patch 2
    store = open_store(path)  # coords and metadata are fine
    with pytest.raises(DamagedStoreError) as e:
        store.features
    msg = str(e.value)
    assert msg.startswith(f"{path}: damaged: the features of rows 2–2 do not match their "
                          "checksums"), msg  # fmt: skip
    assert "--overwrite" in msg
    flip_byte(path, "features", 2 * ROW_BYTES + 5)  # flipped back: whole again
    np.testing.assert_array_equal(open_store(path).features, good)


def test_a_flipped_bit_in_the_coords_is_refused_on_first_read(finished):
    path, _ = finished
    flip_byte(path, "coords", 8)  # y of patch 0
    store = open_store(path)  # the open checks the metadata only (cheap, see the benchmark)
    with pytest.raises(DamagedStoreError, match="coords do not match their checksum") as e:
        store.verify()
    assert str(e.value).startswith(f"{path}: damaged:")
    with pytest.raises(DamagedStoreError, match="coords"):
        store.features


def test_an_edited_recipe_attribute_is_refused(finished):
    path, _ = finished
    with h5py.File(path, "a") as f:
        f.attrs["patch_size"] = 112  # metadata edited behind the store's back
    with pytest.raises(DamagedStoreError, match="metadata .* does not match the digest"):
        open_store(path)


@pytest.mark.parametrize("damage, what", [
    (lambda f: f.attrs.__setitem__("gpfm_n_total", "abc"), "patch counters"),
    (lambda f: f.attrs.__setitem__("gpfm_complete", "yes"), "gpfm_complete is 'yes'"),
    (lambda f: f.__delitem__("coords"), "no 'coords' dataset"),
    (lambda f: f.__delitem__("gpfm_checksums"), "checksum table 'gpfm_checksums' is missing"),
])  # fmt: skip
def test_damaged_metadata_names_the_store_and_what_is_damaged(finished, damage, what):
    path, tif = finished
    with h5py.File(path, "a") as f:
        damage(f)
    with pytest.raises(DamagedStoreError) as e:
        open_store(path, expected_slide=open_slide(tif))
    msg = str(e.value)
    assert msg.startswith(f"{path}: damaged: ") and what in msg, msg


def test_a_finished_store_marked_unfinished_does_not_loop_on_resume(finished, tmp_path, capsys):
    """Damaged completion flags: the message says the store is damaged and to use --overwrite
    (not 'run embed again to resume', which would loop); --overwrite then replaces it."""
    path, tif = finished
    with h5py.File(path, "a") as f:
        f.attrs["gpfm_complete"] = False
    with pytest.raises(DamagedStoreError) as e:
        open_store(path)
    assert "marked unfinished" in str(e.value) and "resume" not in str(e.value).split(".")[0]
    out = path.parents[2]
    assert embed_main([str(tif), "--out", str(out), *QUICK, "--min-tissue", "0.3"]) == 1
    err = capsys.readouterr().err
    assert f"{path}: damaged: it is marked unfinished" in err and "--overwrite" in err
    assert "run `napari-gpfm embed` again" not in err
    assert embed_main([str(tif), "--out", str(out), *QUICK, "--min-tissue", "0.3",
                       "--overwrite"]) == 0  # fmt: skip
    assert np.isfinite(open_store(path).features).all()


def test_damaged_hdf5_structure_names_the_store_not_the_slide(finished):
    path, tif = finished
    with h5py.File(path, "r") as f:
        header = h5py.h5o.get_info(f["coords"].id).addr  # the coords' object header
    raw = bytearray(path.read_bytes())
    raw[header : header + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    with pytest.raises(DamagedStoreError) as e:
        open_store(path, expected_slide=open_slide(tif))
    msg = str(e.value)
    assert msg.startswith(f"{path}: damaged: its datasets or attributes cannot be read"), msg
    assert tif.name not in msg


def test_resume_re_embeds_a_damaged_chunk_of_a_partial(tmp_path, crop, encoder, reference):
    from embed_helpers import FailingEncoder

    tif = write_tiff(tmp_path / "A.tif", crop)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected"):
        api(tif, FailingEncoder(encoder, fail_after=3), out)
    part = partial_path(final_for(encoder, tif, out))
    flip_byte(part, "features", 1 * ROW_BYTES)  # chunk 2 of 3 damaged (a crash mid-write)
    with h5py.File(part, "r") as f:
        assert f.attrs["gpfm_n_done"] == 3
    w = StoreWriter.resume(final_for(encoder, tif, out),
                           recipe=make_recipe(encoder, open_slide(tif), SPEC, FAST),
                           coords=h5py.File(part, "r")["coords"][()], embed_dim=48)  # fmt: skip
    assert w.n_done == 1  # resumes after the last block that matches its checksum
    w.close()
    np.testing.assert_array_equal(open_store(api(tif, encoder, out)).features, reference)


def test_stores_written_before_checksums_still_open(finished):
    path, _ = finished
    with h5py.File(path, "a") as f:
        strip_integrity(f)
    store = open_store(path)
    assert not store.checksummed and store.features.shape == (4, 48)


# --------------------------------------------------------------------------------------------
# 5. The slide file replaced between a kill and the resume, or after finishing
# --------------------------------------------------------------------------------------------


def test_slide_replaced_between_a_kill_and_the_resume_is_refused(tmp_path, crop, monkeypatch,
                                                                 capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    tif = write_tiff(slides / "X.tif", crop)
    out = tmp_path / "out"
    forward, calls = run_mod.BatchForward.submit, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # the run is killed after two patches
        return forward(*args, **kwargs)

    monkeypatch.setattr(run_mod.BatchForward, "submit", killed)
    assert embed_main([str(tif), "--out", str(out), *QUICK]) == 130
    monkeypatch.setattr(run_mod.BatchForward, "submit", forward)
    final = store_path(out, TINY, "X", TILING)
    part = partial_path(final)
    before = snapshot(part)
    with h5py.File(part, "r") as f:
        assert f.attrs["gpfm_n_done"] == 2

    write_tiff(tif, crop[::-1])  # replaced: same path, name, size in pixels and mpp
    capsys.readouterr()
    assert embed_main([str(tif), "--out", str(out), *QUICK]) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("FAILED: "))
    assert str(part) in line and str(tif.resolve()) in line, line  # the store and the slide
    assert "different file at the same path (was the slide replaced?)" in line
    assert snapshot(part) == before and not final.exists()  # nothing mixed in


def test_slide_changed_after_finishing_is_refused_not_skipped(tmp_path, crop, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    tif = write_tiff(slides / "X.tif", crop)
    out = tmp_path / "out"
    assert embed_main([str(tif), "--out", str(out), *QUICK]) == 0
    final = store_path(out, TINY, "X", TILING)
    before = snapshot(final)
    assert embed_main([str(tif), "--out", str(out), *QUICK]) == 0  # unchanged: skipped
    assert "skipped (already done)" in capsys.readouterr().out

    write_tiff(tif, crop[:, ::-1])  # the file changed after the store was finished
    assert embed_main([str(tif), "--out", str(out), *QUICK]) == 1
    captured = capsys.readouterr()
    assert "skipped" not in captured.out
    line = next(ln for ln in captured.err.splitlines() if ln.startswith("FAILED: "))
    assert str(final) in line and str(tif.resolve()) in line, line
    assert "was the slide replaced?" in line
    assert snapshot(final) == before
    with pytest.raises(SlideMismatchError):
        open_store(final, expected_slide=open_slide(tif))
