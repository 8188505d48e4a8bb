"""`weights_digest` hashes a weights file once per file version, across processes: the digest
is kept in a small JSON cache keyed by the file's path, size, mtime and ctime, so re-running
`napari-gpfm embed` over a finished cohort reads no weights. A changed file is hashed again, and
a damaged cache is ignored and rewritten, never trusted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import napari_gpfm.encoders.checkpoint as checkpoint
import napari_gpfm.jobs.embed as embed_job
from napari_gpfm.encoders import get_card
from napari_gpfm.jobs.embed import digest_cache_path, weights_digest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private digest cache, and no digest remembered by this process."""
    d = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_GPFM_CACHE_DIR", str(d))
    monkeypatch.setattr(embed_job, "_DIGESTS", {})
    return d


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "weights" / "GPFM.pth"
    path.parent.mkdir()
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))  # several 1 MiB hashing chunks
    return path


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The files `sha256_file` hashes (it still hashes them)."""
    real, seen = checkpoint.sha256_file, []

    def counting(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(checkpoint, "sha256_file", counting)
    return seen


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_process(monkeypatch) -> None:
    """What a new process sees: no digest in memory, and hashing any file fails the test."""
    monkeypatch.setattr(embed_job, "_DIGESTS", {})

    def refuse(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(checkpoint, "sha256_file", refuse)


def cache_entries(cache_dir: Path) -> dict:
    data = json.loads((cache_dir / "weights-digests.json").read_text())
    assert data["version"] == 1
    return data["entries"]


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_GPFM_CACHE_DIR", str(tmp_path / "x"))
    assert digest_cache_path() == tmp_path / "x" / "weights-digests.json"
    monkeypatch.delenv("NAPARI_GPFM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert digest_cache_path() == tmp_path / "home/.cache/napari-gpfm/weights-digests.json"


def test_a_fresh_process_reads_the_digest_from_the_cache(weights, cache_dir, hashes,
                                                         monkeypatch):  # fmt: skip
    digest = weights_digest(None, weights=weights)
    assert digest == sha256(weights) and hashes == [str(weights.resolve())]
    entry = cache_entries(cache_dir)[str(weights.resolve())]
    st = weights.stat()
    assert entry == {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "ctime_ns": st.st_ctime_ns, "sha256": digest}  # fmt: skip

    new_process(monkeypatch)
    assert weights_digest(None, weights=weights) == digest
    assert weights_digest(None, weights=weights) == digest  # then from memory


def test_the_card_weights_are_cached_too(weights, tmp_path, hashes, monkeypatch):
    """The GPFM card (sha256 unknown) with its weights found through $GPFM_WEIGHTS, here via
    a symlink: the cache is keyed by the resolved file."""
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(tmp_path / "no-user-models"))
    link = tmp_path / "GPFM-link.pth"
    link.symlink_to(weights)
    monkeypatch.setenv("GPFM_WEIGHTS", str(link))
    card = get_card("gpfm")
    assert card.weights.sha256 is None
    assert weights_digest(card) == sha256(weights) and len(hashes) == 1

    new_process(monkeypatch)
    assert weights_digest(card) == sha256(weights)
    assert weights_digest(None, weights=weights) == sha256(weights)  # the same file, by name


def test_a_new_process_does_not_open_the_weights(weights, cache_dir):
    """A real second process: an audit hook records every file it opens; it opens the cache,
    never the weights."""
    expected = weights_digest(None, weights=weights)
    code = textwrap.dedent(f"""
        import sys
        weights = {str(weights)!r}
        opened = []
        sys.addaudithook(lambda event, args: opened.append(str(args[0]))
                         if event == "open" and args and isinstance(args[0], str) else None)
        from napari_gpfm.jobs.embed import weights_digest
        digest = weights_digest(None, weights=weights)
        assert not [p for p in opened if p.endswith("GPFM.pth")], opened
        assert any(p.endswith("weights-digests.json") for p in opened), opened
        print(digest)
    """)
    env = {**os.environ, "NAPARI_GPFM_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def _bump_ctime() -> None:
    """Let the clock move on, so that the next write gets a new ctime even on file systems
    whose timestamps are coarse (ext4: one jiffy)."""
    time.sleep(0.05)


def test_a_touched_file_is_hashed_again(weights, hashes, monkeypatch):
    first = weights_digest(None, weights=weights)
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # `touch`
    monkeypatch.setattr(embed_job, "_DIGESTS", {})
    assert weights_digest(None, weights=weights) == first
    assert len(hashes) == 2


def test_a_file_of_another_size_is_hashed_again(weights, hashes, monkeypatch):
    first = weights_digest(None, weights=weights)
    st = weights.stat()
    with open(weights, "ab") as handle:
        handle.write(b"more")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, other size
    monkeypatch.setattr(embed_job, "_DIGESTS", {})
    second = weights_digest(None, weights=weights)
    assert len(hashes) == 2 and second == sha256(weights) != first


def test_a_file_rewritten_with_its_old_size_and_mtime_is_hashed_again(weights, hashes,
                                                                       monkeypatch):  # fmt: skip
    """`cp -p`, `rsync -t` or a restore can put the old mtime back on new content of the
    same size: the ctime still changes."""
    first = weights_digest(None, weights=weights)
    st = weights.stat()
    _bump_ctime()
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = weights.stat()
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    if now.st_ctime_ns == st.st_ctime_ns:
        pytest.skip("this file system did not change the ctime")
    monkeypatch.setattr(embed_job, "_DIGESTS", {})
    assert weights_digest(None, weights=weights) == sha256(weights) != first
    assert len(hashes) == 2


def _entry_for(weights: Path, **changes) -> dict:
    st = weights.stat()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
             "sha256": "0" * 64}  # fmt: skip
    return {str(weights.resolve()): {**entry, **changes}}


CORRUPT = {
    "binary": lambda w: b"\x00\xff garbage",
    "truncated": lambda w: json.dumps({"version": 1, "entries": _entry_for(w)}).encode()[:-9],
    "a list": lambda w: b"[1, 2, 3]",
    "other version": lambda w: json.dumps({"version": 99, "entries": _entry_for(w)}).encode(),
    "entries not a mapping": lambda w: b'{"version": 1, "entries": [1]}',
    "digest not hex": lambda w: json.dumps(
        {"version": 1, "entries": _entry_for(w, sha256="../" * 21 + "x")}).encode(),
    "huge": lambda w: b" " * (2 << 20) + json.dumps({"version": 1,
                                                       "entries": _entry_for(w)}).encode(),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_a_damaged_cache_is_ignored_and_rewritten(kind, weights, cache_dir, hashes):
    """Each damaged cache would give the wrong digest "000…" if it were believed."""
    cache_dir.mkdir()
    (cache_dir / "weights-digests.json").write_bytes(CORRUPT[kind](weights))
    assert weights_digest(None, weights=weights) == sha256(weights)
    assert len(hashes) == 1
    assert cache_entries(cache_dir)[str(weights.resolve())]["sha256"] == sha256(weights)


@pytest.mark.parametrize("field", ["size", "mtime_ns", "ctime_ns"])
def test_an_entry_of_another_file_version_is_not_used(field, weights, cache_dir, hashes):
    """A well-formed entry for the same path but another size, mtime or ctime."""
    cache_dir.mkdir()
    now = _entry_for(weights)[str(weights.resolve())][field]
    stale = _entry_for(weights, **{field: now - 1})
    (cache_dir / "weights-digests.json").write_text(json.dumps({"version": 1, "entries": stale}))
    assert weights_digest(None, weights=weights) == sha256(weights)
    assert len(hashes) == 1


def test_a_file_written_while_hashed_is_not_cached(weights, cache_dir, monkeypatch):
    real = checkpoint.sha256_file

    def racing(path):
        digest = real(path)
        with open(path, "ab") as handle:  # e.g. a download still writing it
            handle.write(b"late bytes")
        return digest

    monkeypatch.setattr(checkpoint, "sha256_file", racing)
    weights_digest(None, weights=weights)
    assert not (cache_dir / "weights-digests.json").exists()
    assert embed_job._DIGESTS == {}


def test_the_cache_forgets_gone_changed_and_old_files(tmp_path, cache_dir, hashes,
                                                      monkeypatch):  # fmt: skip
    monkeypatch.setattr(embed_job, "_CACHE_MAX_ENTRIES", 4)
    files = []
    for i in range(7):
        files.append(tmp_path / f"w{i}.pth")
        files[-1].write_bytes(b"weights %d" % i)
    files[0].unlink()
    for f in files[1:6]:
        weights_digest(None, weights=f)
    assert weights_digest(None, weights=files[0]) is None  # gone: no digest, nothing cached
    names = [str(f.resolve()) for f in files]
    assert list(cache_entries(cache_dir)) == names[2:6]  # the 4 most recent
    files[3].unlink()  # gone
    files[4].write_bytes(b"new weights 4")  # changed: its entry is useless
    weights_digest(None, weights=files[6])
    assert list(cache_entries(cache_dir)) == [names[2], names[5], names[6]]


def test_an_unwritable_cache_is_not_an_error(weights, tmp_path, monkeypatch, hashes):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("NAPARI_GPFM_CACHE_DIR", str(blocker))
    assert weights_digest(None, weights=weights) == sha256(weights)
    assert weights_digest(None, weights=weights) == sha256(weights)  # from memory
    assert len(hashes) == 1
    assert not list(tmp_path.glob("**/.weights-digests.json.*.tmp"))
