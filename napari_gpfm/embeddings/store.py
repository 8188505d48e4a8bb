"""TRIDENT-compatible HDF5 feature files: a resumable writer and a checking reader.

Layout of ``<out>/<tiling>/features_<model>/<slide>.h5`` (one self-contained file per slide,
tiling and model; TRIDENT's job-folder layout). ``<tiling>`` is :func:`tiling_dir_name`, e.g.
``0.5mpp_224px_0px_overlap``, so stores of several tilings live side by side; ``<slide>`` is
:attr:`Slide.name <napari_gpfm.slide.Slide>` (the file name without its last extension).

- dataset ``features`` (N, D) float32, attrs ``encoder`` (model name), ``name`` (slide name);
- dataset ``coords`` (N, 2) int64, level-0 top-left ``x, y`` in row-major scan order, with the
  TRIDENT attrs ``patch_size`` (px at the target mpp), ``patch_size_level0``,
  ``level0_magnification`` and ``target_magnification`` (exact, ``10 / mpp``), ``overlap``,
  ``name``, ``level0_width``, ``level0_height`` (mirrored on the file root);
- dataset ``tissue_fraction`` (N,) float32;
- root attrs ``gpfm_model``, ``gpfm_weights_sha256``, ``gpfm_mpp``, ``gpfm_mpp_source``,
  ``gpfm_target_mpp``, ``gpfm_input_size``, ``gpfm_recipe`` (JSON), ``gpfm_recipe_key``,
  ``gpfm_tissue_params`` (JSON), ``gpfm_version``, ``gpfm_slide_fingerprint`` (JSON of
  :class:`~napari_gpfm.slide.SlideFingerprint`), ``gpfm_slide_path`` (absolute path of the slide
  at write time), ``gpfm_n_total``, ``gpfm_n_done`` and ``gpfm_complete`` (set last).

Slide identity: two different files can have the same name (``X.svs`` in two folders, a file
replaced by another). The writer records the slide's fingerprint; resuming a ``.partial``,
reusing a finished store (``embed_slide``) and :func:`open_store` with ``expected_slide`` refuse a
store of another file with :class:`SlideMismatchError`. Stores written before fingerprints
existed are compared by their recorded ``level0_width``/``level0_height`` only.

While a slide is being embedded the file lives next to its final name as ``<slide>.h5.partial``
(so tools globbing ``*.h5`` never pick up a half-written file). All coords are written up front,
features are written chunk by chunk into a preallocated dataset and ``gpfm_n_done`` is flushed
after each chunk; a killed run resumes at ``gpfm_n_done``. When the last chunk is in,
``gpfm_complete`` is set, the file is forced to disk (fsync) and renamed to ``<slide>.h5``.

Integrity (stores written since checksums exist; older ones open unchecked):

- root attrs ``gpfm_checksum`` (``"wsum64/1"``, see :func:`wsum64`), ``gpfm_coords_checksum``
  (both sums of the coords), ``gpfm_meta_sha256`` (sha256 of the attributes fixed at creation:
  recipe, tiling, slide fingerprint, patch count) and ``gpfm_n_nonfinite``;
- dataset ``gpfm_checksums`` (M, 5) uint64: ``start, stop, nonfinite_rows, sum, weighted_sum``,
  one row per written chunk of features (chunks over 1 MiB are split).

:func:`open_store` checks the metadata digest and that the checksums exist (~0.02 ms: about
1 % of opening a 100,000-patch store, ``bench/bench_store_integrity.py``). The coords and the
features are checked lazily, on the first read of the features (:attr:`FeatureStore.features`,
or :meth:`FeatureStore.verify`): every chunk; that read costs about 1.5× an unchecked one from
the page cache. A mismatch raises :class:`DamagedStoreError` naming the store and what is
damaged (the coords, or the patch rows).
Resuming checks the chunks already written and resumes after the last one that matches.
:meth:`StoreWriter.finish` refuses to mark complete a store with NaN or inf features
(:class:`NonFiniteFeaturesError`, the partial file stays for inspection).

Disk full: every write goes through a :class:`GuardedFile` (h5py's ``fileobj`` driver), which
keeps HDF5 from the half-closed file that made a full disk crash the process; a full disk or
an I/O error raises one :class:`~napari_gpfm.errors.OutputWriteError` naming the file, the
partial file keeps the chunks flushed before (resumable), a previous store is untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from napari_gpfm.errors import NapariGpfmError, OutputWriteError
from napari_gpfm.slide.identity import SlideFingerprint, slide_fingerprint

from .recipe import EmbeddingRecipe, format_diff

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DamagedStoreError",
    "ExternalFeaturesWarning",
    "FeatureStore",
    "GuardedFile",
    "IncompleteStoreError",
    "InferredPatchSizeWarning",
    "NonFiniteFeaturesError",
    "OutputWriteError",
    "PrecisionMismatchError",
    "RecipeMismatchError",
    "SlideMismatchError",
    "StoreError",
    "StoreWriter",
    "atomic_h5",
    "check_finite",
    "check_slide",
    "find_store",
    "open_store",
    "partial_path",
    "recipe_store_path",
    "store_path",
    "tiling_dir_name",
]

PARTIAL_SUFFIX = ".partial"
TRIDENT_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "level0_width",
    "level0_height",
)


class StoreError(NapariGpfmError):
    """A feature file is missing, unreadable or unusable; the message names the file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class IncompleteStoreError(StoreError):
    """The feature file belongs to a run that has not finished (or was interrupted)."""


class DamagedStoreError(StoreError):
    """The feature file is damaged: its features or coords do not match their checksums, or
    its metadata (attributes, datasets) is unreadable, inconsistent or was edited. The message
    names the store file and what is damaged; re-embedding with ``--overwrite`` replaces it."""


class NonFiniteFeaturesError(StoreError, ValueError):
    """Features hold NaN or inf: a store is not marked complete with them, and classifiers
    refuse them (their probabilities would be NaN). ``rows``: how many patches are affected."""

    def __init__(self, path: str | Path, problem: str, rows: int = 0) -> None:
        self.rows = int(rows)
        super().__init__(path, problem)


def check_finite(features: np.ndarray, path: str | Path, what: str = "features") -> None:
    """Raise :class:`NonFiniteFeaturesError` naming ``path`` and counting the rows when
    ``features`` hold NaN or inf (one pass of a float64 sum; the count only when it fails)."""
    x = np.asarray(features)
    if x.size == 0 or np.isfinite(x.sum(dtype=np.float64)):
        return
    bad = int(np.count_nonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)))
    if bad:
        raise NonFiniteFeaturesError(
            path,
            f"{bad} of {len(x)} patches have non-finite {what} (NaN or inf); they cannot be "
            "classified. Re-embed the slide (--overwrite) with a model whose outputs are "
            "finite",
            rows=bad,
        )


class RecipeMismatchError(StoreError, ValueError):
    """Features were made with another embedding recipe than the one expected: a feature file
    refused by :func:`open_store` / :func:`find_store`, or a classifier (linear probe) refused
    for features of another recipe (``napari_gpfm.analyses.probe`` re-exports this class).

    Attributes:
        path: the file refused (feature file or classifier file).
        diff: ``{recipe key: (found value, expected value)}``, from
            :func:`~napari_gpfm.embeddings.recipe.recipe_diff`.
    """

    def __init__(
        self, path: str | Path, diff: dict[str, tuple[Any, Any]], problem: str | None = None
    ) -> None:
        self.diff = dict(diff)
        if problem is None:
            problem = (
                "made with a different recipe than expected (" + format_diff(self.diff) + "). "
                "Re-embed with --overwrite, or point to another output folder."
            )
        super().__init__(path, problem)


class PrecisionMismatchError(RecipeMismatchError):
    """A store (finished or partial) was computed in another precision than the run asks for,
    or records none (made before precision was recorded, on a device it does not record): its
    rows must not be mixed with, or stand for, features of the precision asked.

    Attributes:
        found: the store's precision (``None``: unknown).
        expected: the precision asked for.
    """

    def __init__(self, path: str | Path, found: str | None, expected: str,
                 partial: bool = False) -> None:  # fmt: skip
        self.found, self.expected = found, expected
        what = "resume" if partial else "use"
        if found is None:
            problem = (
                f"records no precision (made before napari-gpfm recorded it, on a device it "
                f"does not record either: fp32 on a CPU, bf16 on CUDA), so it cannot be "
                f"trusted to hold {expected} features; refusing to {what} it. It can still be "
                f"opened for viewing; re-embed with --overwrite to make a {expected} store"
            )
        else:
            problem = (
                f"was computed in {found} but this run asks for {expected}; refusing to "
                f"{what} it (the rows of two precisions must not mix). Rerun with "
                f"--precision {found} to {what} it, or --overwrite to re-embed in {expected}"
            )
        super().__init__(path, {"precision": (found, expected)}, problem)


class SlideMismatchError(StoreError):
    """The feature file was computed from another slide file than the one given (same name).

    Attributes:
        recorded: description of the slide the features were computed from.
        current: description of the slide given now.
        recorded_fingerprint: its fingerprint, ``None`` for stores that predate fingerprints.
        current_fingerprint: the given slide's fingerprint.
    """

    def __init__(
        self,
        path: str | Path,
        recorded: str,
        current: SlideFingerprint,
        recorded_fingerprint: SlideFingerprint | None = None,
        same_path: bool = False,
    ) -> None:
        self.recorded = recorded
        self.current = current.describe()
        self.recorded_fingerprint = recorded_fingerprint
        self.current_fingerprint = current
        what = (
            "a different file at the same path (was the slide replaced?)"
            if same_path
            else "a different slide with the same name"
        )
        super().__init__(
            path,
            f"these features were computed from {recorded} but the slide now is "
            f"{self.current}, {what}. Choose another output folder, or overwrite "
            "(--overwrite) to replace them.",
        )


class ExternalFeaturesWarning(UserWarning):
    """Features from another tool: their recipe (model, mpp, tiling) cannot be checked."""


class InferredPatchSizeWarning(ExternalFeaturesWarning):
    """A feature file records no patch size; it was inferred from its coordinate grid."""


def safe_name(name: str) -> str:
    """File-system-safe version of a model or slide name."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("._")
    return cleaned or "unnamed"


def tiling_dir_name(target_mpp: float, patch_size: int, overlap: int = 0) -> str:
    """The tiling's folder (TRIDENT-style): ``0.5mpp_224px_0px_overlap``."""
    return f"{float(target_mpp):g}mpp_{int(patch_size)}px_{int(overlap)}px_overlap"


def store_path(out_dir: str | Path, model: str, slide_name: str, tiling: str) -> Path:
    """``<out_dir>/<tiling>/features_<model>/<slide_name>.h5``; ``tiling`` from
    :func:`tiling_dir_name`."""
    return Path(out_dir) / tiling / f"features_{safe_name(model)}" / f"{slide_name}.h5"


def recipe_store_path(out_dir: str | Path, recipe: EmbeddingRecipe, slide_name: str) -> Path:
    """Where the store of ``slide_name`` under ``recipe`` lives in ``out_dir``."""
    tiling = tiling_dir_name(recipe.target_mpp, recipe.patch_size, recipe.overlap)
    return store_path(out_dir, recipe.model, slide_name, tiling)


def partial_path(path: str | Path) -> Path:
    """Where the unfinished version of ``path`` lives (``<slide>.h5.partial``)."""
    p = Path(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def _attr(v: Any) -> Any:
    """Value storable as an HDF5 attribute (None → empty string)."""
    return "" if v is None else v


def _as_fingerprint(slide: Any) -> SlideFingerprint:
    return slide if isinstance(slide, SlideFingerprint) else slide_fingerprint(slide)


def _decoded(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def check_slide(path: str | Path, attrs: Any, expected: Any) -> None:
    """Raise :class:`SlideMismatchError` unless the store whose attrs are ``attrs`` was computed
    from ``expected`` (a Slide or :class:`SlideFingerprint`).

    With a recorded fingerprint the files are compared (size, dimensions, digest); without one
    (older stores, other tools' files) the recorded ``level0_width``/``level0_height`` are;
    a store recording neither is accepted.
    """
    current = _as_fingerprint(expected)
    recorded_json = _decoded(attrs.get("gpfm_slide_fingerprint", ""))
    recorded_path = str(_decoded(attrs.get("gpfm_slide_path", "")) or "")
    if recorded_json:
        try:
            recorded = SlideFingerprint.from_json(recorded_json)
        except ValueError as e:
            raise StoreError(path, f"unreadable gpfm_slide_fingerprint attribute ({e})") from e
        if recorded.matches(current):
            return
        if recorded_path and not recorded.path:
            recorded = dataclasses.replace(recorded, path=recorded_path)
        raise SlideMismatchError(
            path, recorded.describe(), current, recorded, same_path=recorded.path == current.path
        )
    w, h = attrs.get("level0_width"), attrs.get("level0_height")
    if w is None or h is None or (int(w), int(h)) == (current.width, current.height):
        return
    where = recorded_path or "a slide"
    raise SlideMismatchError(
        path,
        f"{where} ({int(w)}×{int(h)} px; the feature file records no slide fingerprint)",
        current,
        same_path=bool(recorded_path) and recorded_path == current.path,
    )


def _locked(path: Path) -> StoreError:
    return StoreError(
        path,
        "locked by another process (is another embed run writing this slide, or a worker "
        "process of a killed run still alive?); wait for it to finish or stop it",
    )


# --------------------------------------------------------------------------------------------
# Integrity: checksums of features and coords
# --------------------------------------------------------------------------------------------

#: Name of the checksum recorded in ``gpfm_checksum`` (see :func:`wsum64`).
CHECKSUM_ALGO = "wsum64/1"
#: (M, 5) uint64 dataset, one row per checksum block of written features.
CHECKSUM_DATASET = "gpfm_checksums"
CHECKSUM_COLUMNS = ("start", "stop", "nonfinite_rows", "sum", "weighted_sum")
#: At most this many bytes of features per checksum block (a written chunk may give several).
BLOCK_BYTES = 1 << 20
#: Root attributes fixed when the store is created, covered by ``gpfm_meta_sha256``.
_META_ATTRS = (
    *TRIDENT_ATTRS, "gpfm_model", "gpfm_weights_sha256", "gpfm_mpp", "gpfm_mpp_source",
    "gpfm_target_mpp", "gpfm_input_size", "gpfm_recipe", "gpfm_recipe_key", "gpfm_tissue_params",
    "gpfm_version", "gpfm_n_total", "gpfm_slide_fingerprint", "gpfm_slide_path",
    "gpfm_checksum", "gpfm_coords_checksum", "gpfm_precision", "gpfm_device",
)  # fmt: skip

_WEIGHTS = np.zeros(0, np.uint64)


def _weights(n: int) -> np.ndarray:
    """The odd weights 1, 3, 5, ... (uint64) of :func:`wsum64`, cached."""
    global _WEIGHTS
    if _WEIGHTS.size < n:
        _WEIGHTS = np.arange(1, 2 * max(n, 1 << 16), 2, dtype=np.uint64)
    return _WEIGHTS[:n]


def _words(a: np.ndarray) -> np.ndarray:
    """The bytes of ``a`` (C order, little-endian) as uint64 words, zero-padded."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<")))
    raw = a.reshape(-1).view(np.uint8)
    if raw.size % 8:
        raw = np.concatenate([raw, np.zeros(8 - raw.size % 8, np.uint8)])
    return raw.view("<u8")


def wsum64(a: np.ndarray) -> tuple[int, int]:
    """Checksum of an array's bytes: ``(Σ w_k, Σ (2k+1)·w_k)`` mod 2⁶⁴ over its little-endian
    64-bit words ``w_k`` (zero-padded).

    A Fletcher-style pair computed at memory speed with numpy (a 400 MB feature matrix in a few
    tens of ms, CRC-32 takes ~4× longer here): any change confined to one 8-byte word is always
    caught (first sum), so is any pair of single-bit flips below the top two bits of a word
    (second sum), any reordering of words, and random damage with probability 1 − 2⁻⁶⁴.
    """
    w = _words(a)
    total = weighted = 0
    # in segments (bounded weights): Σ(2(k0+j)+1)·w = Σ(2j+1)·w + 2·k0·Σw over each segment
    for k0 in range(0, w.size, _SEGMENT):
        seg = w[k0 : k0 + _SEGMENT]
        s = int(seg.sum(dtype=np.uint64))
        weighted = (weighted + int(np.dot(seg, _weights(seg.size))) + 2 * k0 * s) & _MASK64
        total = (total + s) & _MASK64
    return total, weighted


_SEGMENT = 1 << 20  # words per segment of wsum64 (8 MiB)
_MASK64 = (1 << 64) - 1


def _block_rows(n_rows: int, row_bytes: int) -> int:
    return max(1, min(n_rows, BLOCK_BYTES // max(1, row_bytes)))


def _checksum_rows(start: int, feats: np.ndarray) -> np.ndarray:
    """The checksum table rows of ``feats`` written at row ``start``: (k, 5) uint64."""
    n = feats.shape[0]
    step = _block_rows(n, feats.shape[1] * feats.itemsize)
    rows = []
    finite = np.isfinite(feats).all(axis=1)
    for a in range(0, n, step):
        b = min(n, a + step)
        s, ws = wsum64(feats[a:b])
        rows.append((start + a, start + b, int(b - a - np.count_nonzero(finite[a:b])), s, ws))
    return np.array(rows, dtype=np.uint64).reshape(-1, 5)


def _bad_blocks(feats: np.ndarray, table: np.ndarray) -> list[int]:
    """Indices of the table rows whose features do not match their checksums (runs of blocks of
    one size are checked with one numpy call)."""
    bad: list[int] = []
    starts = table[:, 0].astype(np.int64)
    sizes = table[:, 1].astype(np.int64) - starts
    i, m = 0, len(table)
    row_bytes = feats.shape[1] * feats.itemsize
    while i < m:
        j = i
        while j + 1 < m and sizes[j + 1] == sizes[i] and starts[j + 1] == starts[j] + sizes[i]:
            j += 1
        k, r = j - i + 1, int(sizes[i])
        block_bytes = r * row_bytes
        if k > 1 and block_bytes % 8 == 0 and feats.dtype.isnative and feats.flags.c_contiguous:
            seg = feats[starts[i] : starts[i] + k * r].reshape(-1).view(np.uint64)
            w = seg.reshape(k, block_bytes // 8)
            s = w.sum(axis=1, dtype=np.uint64)
            ws = w @ _weights(block_bytes // 8)
            wrong = (s != table[i : j + 1, 3]) | (ws != table[i : j + 1, 4])
            bad.extend(int(x) + i for x in np.nonzero(wrong)[0])
        else:
            for q in range(i, j + 1):
                s0, ws0 = wsum64(feats[starts[q] : starts[q] + sizes[q]])
                if (s0, ws0) != (int(table[q, 3]), int(table[q, 4])):
                    bad.append(q)
        i = j + 1
    return bad


def _table_problem(table: np.ndarray, n: int) -> str | None:
    """Why a checksum table does not cover rows ``0..n`` exactly once, in order (None: it does)."""
    if table.ndim != 2 or table.shape[1] != 5:
        return f"its checksum table has shape {table.shape}, expected (blocks, 5)"
    if n == 0:
        return None if len(table) == 0 else "its checksum table covers rows that do not exist"
    if len(table) == 0:
        return "its checksum table is empty"
    starts, stops = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
    if starts[0] != 0 or stops[-1] != n or (stops <= starts).any() or (
            starts[1:] != stops[:-1]).any():  # fmt: skip
        return (f"its checksum table does not cover the {n} patches in order "
                f"(blocks from {int(starts.min())} to {int(stops.max())})")  # fmt: skip
    return None


def _describe_blocks(table: np.ndarray, bad: list[int]) -> str:
    spans = [f"{int(table[q, 0])}–{int(table[q, 1]) - 1}" for q in bad[:3]]
    more = f" and {len(bad) - 3} more blocks" if len(bad) > 3 else ""
    return "rows " + ", ".join(spans) + more


def meta_digest(attrs: Any) -> str:
    """sha256 of the store attributes fixed at creation (``_META_ATTRS`` that are present)."""
    blob = {}
    for k in _META_ATTRS:
        if k in attrs:
            v = _decoded(attrs[k])
            if isinstance(v, np.ndarray):
                v = v.tolist()
            blob[k] = v
    text = json.dumps(blob, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Writing HDF5 without crashing on a full disk
# --------------------------------------------------------------------------------------------

# The OS calls GuardedFile makes (tests inject ENOSPC/EIO here).
_pwrite = os.pwrite
_pread = os.pread
_fsync = os.fsync


class GuardedFile:
    """A file for h5py's ``fileobj`` driver that keeps HDF5 away from a failed disk.

    Why: when a write fails (disk full, I/O error) *while HDF5 closes a file*, HDF5 (1.8 to 2.0)
    leaves it half torn down ("Can't decrement id ref count"), and the next attempt to free it,
    at garbage collection or exit, crashes the process ("Can't destroy cache (slist already
    enabled?)", then a segmentation fault; h5py issue #914). Through this object:

    - the first failed write raises its ``OSError`` to the h5py call that caused it (h5py passes
      it through) and HDF5's metadata cache stays intact;
    - every later write, truncate or flush is discarded, and writes during :meth:`closing` never
      raise (they are recorded in :attr:`failed`), so HDF5's close always succeeds and frees
      everything; the caller reads :attr:`failed` after closing and reports it;
    - writes are complete (short writes are continued), reads past the end are zero-filled;
    - it takes the exclusive ``flock`` HDF5 would take, so a second writer, or HDF5 opening the
      file, is refused while it is open (``BlockingIOError``).

    The file on disk then holds what was written before the error; it is never renamed to a
    final name by the writers here.
    """

    def __init__(self, path: str | Path, create: bool) -> None:
        self.path = Path(path)
        self.failed: OSError | None = None
        self._closing = False
        self._pos = 0
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | (os.O_CREAT if create else 0)
        fd = os.open(self.path, flags, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if create:
                os.ftruncate(fd, 0)  # only once the lock is held
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    # file-object protocol used by h5py
    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == os.SEEK_SET:
            self._pos = int(offset)
        elif whence == os.SEEK_CUR:
            self._pos += int(offset)
        else:
            self._pos = os.fstat(self._fd).st_size + int(offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        while got < len(view):
            chunk = _pread(self._fd, len(view) - got, self._pos + got)
            if not chunk:
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        if got < len(view):  # past the end of the file: zeros, as HDF5's own driver gives
            view[got:] = bytes(len(view) - got)
        self._pos += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, os.fstat(self._fd).st_size - self._pos)
        buf = bytearray(size)
        self.readinto(buf)
        return bytes(buf)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.failed is None:
            try:
                done = 0
                while done < n:
                    k = _pwrite(self._fd, view[done:], self._pos + done)
                    if k <= 0:
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                    done += k
            except OSError as e:
                self.failed = e
                if not self._closing:
                    raise
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else int(size)
        if self.failed is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as e:
                self.failed = e
                if not self._closing:
                    raise
        return size

    def flush(self) -> None:  # unbuffered: every write went to the OS already
        return None

    def fsync(self) -> None:
        """Force the file to disk: a full disk that the OS only reports now raises here."""
        if self.failed is not None:
            raise self.failed
        try:
            _fsync(self._fd)
        except OSError as e:
            self.failed = e
            raise

    @contextlib.contextmanager
    def closing(self) -> Any:
        """While HDF5 closes the file: write errors are recorded, never raised into HDF5."""
        self._closing = True
        try:
            yield
        finally:
            self._closing = False

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)  # releases the lock

    def __del__(self) -> None:  # only once nothing (HDF5 included) refers to it
        with contextlib.suppress(Exception):
            self.close()


def _io_errno(exc: BaseException, guard: GuardedFile | None) -> int | None:
    """The errno of an I/O failure behind ``exc`` (None: not an I/O failure)."""
    if guard is not None and guard.failed is not None:
        return guard.failed.errno or errno.EIO
    if isinstance(exc, OSError) and not isinstance(exc, NapariGpfmError) and exc.errno:
        return int(exc.errno)
    return None


def open_guarded_h5(path: str | Path, create: bool) -> tuple[h5py.File, GuardedFile]:
    """``(h5py.File, GuardedFile)`` writing ``path`` through a :class:`GuardedFile`
    (``create``: a new, empty file; else ``r+``). Raises ``BlockingIOError`` when another
    process holds the file."""
    guard = GuardedFile(path, create)
    try:
        h5 = h5py.File(guard, "w" if create else "r+")
    except BaseException:
        guard.close()
        raise
    return h5, guard


def close_guarded_h5(h5: h5py.File | None, guard: GuardedFile | None,
                     fsync: bool = False) -> OSError | None:  # fmt: skip
    """Flush, close (datasets before the file: h5py closes every object of the file first) and
    release ``guard``; returns the I/O error met on the way (``None``: everything is on disk).
    Never raises for an I/O error and never leaves HDF5 with a half-closed file."""
    err: OSError | None = None
    try:
        if h5 is not None and h5.id.valid:
            try:
                h5.flush()  # a failure here leaves HDF5's cache intact; later writes are dropped
            except Exception as e:
                err = guard.failed if guard is not None and guard.failed else _as_oserror(e)
            cm = guard.closing() if guard is not None else contextlib.nullcontext()
            with cm:
                try:
                    h5.close()
                except Exception as e:
                    err = err or (guard.failed if guard is not None and guard.failed
                                  else _as_oserror(e))  # fmt: skip
        if guard is not None:
            if guard.failed is not None:
                err = err or guard.failed
            elif fsync and err is None:
                try:
                    guard.fsync()
                except OSError as e:
                    err = e
    finally:
        if guard is not None:
            guard.close()
    return err


def _as_oserror(exc: BaseException) -> OSError:
    if isinstance(exc, OSError) and exc.errno:
        return exc
    return OSError(errno.EIO, f"{type(exc).__name__}: {exc}")


@contextlib.contextmanager
def atomic_h5(path: str | Path) -> Any:
    """Write a whole HDF5 file: yields an ``h5py.File`` on a temporary file beside ``path``,
    renamed to ``path`` only when the block ended and everything is on disk. On any failure the
    temporary file is removed, the previous ``path`` (if any) is untouched, and an I/O failure
    (disk full, I/O error, no permission) raises one
    :class:`~napari_gpfm.errors.OutputWriteError` naming ``path``."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    kept = _kept_message(final)
    h5 = guard = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        h5, guard = open_guarded_h5(tmp, create=True)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputWriteError(final, e.errno or errno.EIO, kept) from e
    try:
        yield h5
    except BaseException as e:
        close_guarded_h5(h5, guard)
        with contextlib.suppress(OSError):
            tmp.unlink()
        code = _io_errno(e, guard)
        if code is not None:
            raise OutputWriteError(final, code, kept) from e
        raise
    err = close_guarded_h5(h5, guard, fsync=True)
    if err is None:
        try:
            os.replace(tmp, final)
        except OSError as e:
            err = e
    if err is not None:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputWriteError(final, err.errno or errno.EIO, kept) from err


def _kept_message(final: Path) -> str:
    if final.exists():
        return f"the previous {final.name} is untouched"
    return "no output was left behind"


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class StoreWriter:
    """Writes one slide's features chunk by chunk into ``<final>.partial`` (see module doc).

    Use :meth:`create` or :meth:`resume`, then :meth:`write` per chunk, then :meth:`finish`.
    :meth:`close` (also via ``with``) flushes and leaves a resumable partial file.

    Every write goes through a :class:`GuardedFile`: a full disk or an I/O error raises one
    :class:`~napari_gpfm.errors.OutputWriteError` naming the partial file, the writer is closed
    (the process never crashes), the partial file keeps the chunks flushed before the error
    (resumable), and a previous store at the final name is untouched.
    """

    def __init__(self, final_path: Path, h5: h5py.File, guard: GuardedFile | None = None,
                 path: Path | None = None) -> None:  # fmt: skip
        self.final_path = Path(final_path)
        self.path = Path(path) if path is not None else partial_path(final_path)
        self._h5: h5py.File | None = h5
        self._guard = guard

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        final_path: str | Path,
        *,
        recipe: EmbeddingRecipe,
        coords: np.ndarray,
        embed_dim: int,
        slide_name: str,
        level0_width: int,
        level0_height: int,
        tissue_fraction: np.ndarray | None = None,
        slide_fingerprint: SlideFingerprint | None = None,
    ) -> StoreWriter:
        """Start a new partial file (replacing any previous one) with all coords written.

        ``slide_fingerprint`` (from :func:`napari_gpfm.slide.slide_fingerprint`) is recorded with
        the slide's path, so that later runs and readers can tell another file of the same
        name apart.
        """
        final_path = Path(final_path)
        part = partial_path(final_path)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n = int(coords.shape[0])
        if n == 0:
            raise StoreError(final_path, "refusing to create a feature file with no patches")
        try:
            final_path.parent.mkdir(parents=True, exist_ok=True)
            h5, guard = open_guarded_h5(part, create=True)
        except BlockingIOError as e:
            raise _locked(part) from e
        except OSError as e:
            raise OutputWriteError(part, e.errno or errno.EIO, _kept_message(final_path)) from e
        try:
            fds = h5.create_dataset("features", shape=(n, int(embed_dim)), dtype=np.float32)
            fds.attrs["encoder"] = recipe.model
            fds.attrs["name"] = slide_name
            cds = h5.create_dataset("coords", data=coords, dtype=np.int64)
            tf = np.ones(n, np.float32) if tissue_fraction is None else tissue_fraction
            h5.create_dataset("tissue_fraction", data=np.asarray(tf, dtype=np.float32))
            h5.create_dataset(CHECKSUM_DATASET, shape=(0, 5), maxshape=(None, 5),
                              chunks=(128, 5), dtype=np.uint64)  # fmt: skip
            h5[CHECKSUM_DATASET].attrs["columns"] = json.dumps(CHECKSUM_COLUMNS)
            trident = {
                "patch_size": int(recipe.patch_size),
                "patch_size_level0": int(recipe.patch_size_level0),
                "level0_magnification": float(10.0 / recipe.mpp),
                "target_magnification": float(10.0 / recipe.target_mpp),
                "overlap": int(recipe.overlap),
                "name": slide_name,
                "level0_width": int(level0_width),
                "level0_height": int(level0_height),
            }
            for k, v in trident.items():
                cds.attrs[k] = v
                h5.attrs[k] = v
            ours = {
                "gpfm_model": recipe.model,
                "gpfm_weights_sha256": _attr(recipe.weights_sha256),
                "gpfm_mpp": float(recipe.mpp),
                "gpfm_mpp_source": _attr(recipe.mpp_source),
                "gpfm_target_mpp": float(recipe.target_mpp),
                "gpfm_input_size": int(recipe.input_size),
                "gpfm_recipe": recipe.to_json(),
                "gpfm_recipe_key": recipe.key(),
                "gpfm_tissue_params": json.dumps(recipe.tissue_params, sort_keys=True),
                "gpfm_version": recipe.versions.get("napari_gpfm", ""),
                "gpfm_n_total": n,
                "gpfm_checksum": CHECKSUM_ALGO,
                "gpfm_coords_checksum": np.array(wsum64(coords), dtype=np.uint64),
                "gpfm_n_done": 0,
                "gpfm_n_nonfinite": 0,
                "gpfm_complete": False,
            }
            if recipe.precision is not None:
                ours["gpfm_precision"] = recipe.precision
            if recipe.device is not None:
                ours["gpfm_device"] = recipe.device
            if slide_fingerprint is not None:
                ours["gpfm_slide_fingerprint"] = slide_fingerprint.to_json()
                ours["gpfm_slide_path"] = slide_fingerprint.path
            for k, v in ours.items():
                h5.attrs[k] = v
            h5.attrs["gpfm_meta_sha256"] = meta_digest(h5.attrs)
            h5.flush()
        except BaseException as e:
            close_guarded_h5(h5, guard)
            part.unlink(missing_ok=True)
            code = _io_errno(e, guard)
            if code is not None:
                raise OutputWriteError(part, code, _kept_message(final_path)) from e
            raise
        return cls(final_path, h5, guard, part)

    @classmethod
    def resume(
        cls,
        final_path: str | Path,
        *,
        recipe: EmbeddingRecipe,
        coords: np.ndarray,
        embed_dim: int,
        slide_fingerprint: SlideFingerprint | None = None,
    ) -> StoreWriter | None:
        """Reopen ``<final>.partial`` if it holds the same recipe, coords and dim, else ``None``.

        The features already written are checked against their checksums first: the run
        resumes after the last block that matches (a block damaged by a crash or a full disk is
        embedded again). An unreadable partial file (e.g. killed in the middle of a write), or
        one written before checksums existed, also gives ``None``; the caller then starts
        afresh.

        Raises:
            SlideMismatchError: ``slide_fingerprint`` is given and the partial file was started
                from another slide file (whatever its recipe): its rows must not be mixed with
                this slide's, and it is not silently thrown away either.
            PrecisionMismatchError: the partial file has this recipe but another precision, or
                records none (and no device to tell it from): never resumed, never silently
                thrown away.
        """
        part = partial_path(final_path)
        if not part.exists():
            return None
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        try:  # everything is checked read-only first: a refused file stays untouched
            with h5py.File(part, "r") as ro:
                if slide_fingerprint is not None:
                    check_slide(part, ro.attrs, slide_fingerprint)
                _check_precision(part, ro.attrs, recipe, partial=True)
                state = _resumable(ro, recipe, coords, int(embed_dim))
        except (SlideMismatchError, PrecisionMismatchError):
            raise
        except BlockingIOError as e:
            raise _locked(part) from e
        except Exception:  # unreadable file or attributes: unusable, start afresh
            return None
        if state is None:
            return None
        n_good, keep, nonfinite = state
        try:
            h5, guard = open_guarded_h5(part, create=False)
        except BlockingIOError as e:
            raise _locked(part) from e
        except OSError:
            return None
        writer = cls(Path(final_path), h5, guard, part)
        with writer._io():
            table = h5[CHECKSUM_DATASET]
            if table.shape[0] != keep or int(h5.attrs["gpfm_n_done"]) != n_good:
                table.resize(keep, axis=0)
                h5.attrs["gpfm_n_done"] = n_good
                h5.attrs["gpfm_n_nonfinite"] = nonfinite
                h5.attrs["gpfm_complete"] = False
                h5.flush()
        return writer

    def reopen(self) -> StoreWriter:
        """Reopen a :meth:`close`-d writer (e.g. after starting loader worker processes)."""
        if self._h5 is None:
            try:
                self._h5, self._guard = open_guarded_h5(self.path, create=False)
            except BlockingIOError as e:
                raise _locked(self.path) from e
            except OSError as e:
                raise OutputWriteError(self.path, e.errno or errno.EIO, self._kept()) from e
        return self

    # -- writing ------------------------------------------------------------------------------

    @property
    def h5(self) -> h5py.File:
        if self._h5 is None:
            raise StoreError(self.path, "writer is closed")
        return self._h5

    @property
    def n_total(self) -> int:
        return int(self.h5.attrs["gpfm_n_total"])

    @property
    def n_done(self) -> int:
        return int(self.h5.attrs["gpfm_n_done"])

    @property
    def n_nonfinite(self) -> int:
        """Patches written so far whose features hold NaN or inf."""
        return int(self.h5.attrs.get("gpfm_n_nonfinite", 0))

    def _kept(self) -> str:
        kept = f"the unfinished {self.path.name} keeps the chunks written before (rerun to resume)"
        if self.final_path.exists():
            kept += f"; the previous {self.final_path.name} is untouched"
        return kept

    @contextlib.contextmanager
    def _io(self) -> Any:
        """Turn an I/O failure into one OutputWriteError and close the writer (no crash)."""
        try:
            yield
        except StoreError:
            raise
        except Exception as e:
            code = _io_errno(e, self._guard)
            if code is None:
                raise
            self._abort()
            raise OutputWriteError(self.path, code, self._kept()) from e

    def _abort(self) -> None:
        h5, guard, self._h5, self._guard = self._h5, self._guard, None, None
        close_guarded_h5(h5, guard)

    def write(self, features: np.ndarray) -> int:
        """Append a chunk at ``n_done`` with its checksums, flush, and return the new
        ``n_done``. Rows holding NaN or inf are counted (:attr:`n_nonfinite`); :meth:`finish`
        refuses a store that has any."""
        feats = np.ascontiguousarray(features, dtype=np.float32)
        start = self.n_done
        stop = start + feats.shape[0]
        ds = self.h5["features"]
        if feats.ndim != 2 or feats.shape[1] != ds.shape[1]:
            raise StoreError(
                self.path, f"chunk shape {feats.shape} does not fit features {ds.shape}"
            )
        if stop > ds.shape[0]:
            raise StoreError(self.path, f"chunk ends at {stop}, beyond the {ds.shape[0]} patches")
        rows = _checksum_rows(start, feats)
        bad = int(rows[:, 2].sum())
        with self._io():
            ds[start:stop] = feats
            table = self.h5[CHECKSUM_DATASET]
            m = table.shape[0]
            table.resize(m + len(rows), axis=0)
            table[m:] = rows
            self.h5.flush()  # features and their checksums on disk before the counter says so
            self.h5.attrs["gpfm_n_done"] = stop
            if bad:
                self.h5.attrs["gpfm_n_nonfinite"] = self.n_nonfinite + bad
            self.h5.flush()
        return stop

    def finish(self) -> Path:
        """Mark complete (last attr written), close, force to disk and move to the final name.

        Raises:
            IncompleteStoreError: not every patch is embedded yet.
            NonFiniteFeaturesError: some features are NaN or inf: the store is not marked
                complete; the partial file stays for inspection.
            OutputWriteError: the disk is full or failed (the partial file stays).
        """
        if self.n_done != self.n_total:
            raise IncompleteStoreError(
                self.path, f"cannot finish: {self.n_done} of {self.n_total} patches embedded"
            )
        bad = self.n_nonfinite
        if bad:
            raise NonFiniteFeaturesError(
                self.path,
                f"{bad} of {self.n_total} patches have non-finite features (NaN or inf), so the "
                "feature file is not marked complete; the unfinished file stays for inspection. "
                "The model produced them: check its weights, or run on the CPU (no half "
                "precision); rerun with --overwrite (overwrite=True) to start afresh",
                rows=bad,
            )
        with self._io():
            self.h5.attrs["gpfm_complete"] = True
        h5, guard, self._h5, self._guard = self._h5, self._guard, None, None
        err = close_guarded_h5(h5, guard, fsync=True)
        if err is None:
            try:
                os.replace(self.path, self.final_path)
            except OSError as e:
                raise OutputWriteError(self.final_path, e.errno or errno.EIO,
                                       self._kept()) from e  # fmt: skip
        else:
            raise OutputWriteError(self.path, err.errno or errno.EIO, self._kept()) from err
        return self.final_path

    def close(self) -> None:
        """Flush and close; the partial file stays resumable. Raises
        :class:`~napari_gpfm.errors.OutputWriteError` when the last flush could not be
        written (the writer is closed all the same)."""
        if self._h5 is None and self._guard is None:
            return
        h5, guard, self._h5, self._guard = self._h5, self._guard, None, None
        err = close_guarded_h5(h5, guard)
        if err is not None:
            raise OutputWriteError(self.path, err.errno or errno.EIO, self._kept()) from err

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:  # already failing: do not hide that exception
            with contextlib.suppress(OutputWriteError):
                self.close()
            return
        self.close()


def _stored_recipe(attrs: Any) -> EmbeddingRecipe | None:
    try:
        return EmbeddingRecipe.from_json(_decoded(attrs["gpfm_recipe"]))
    except Exception:  # noqa: BLE001 - absent or unreadable: not ours to judge here
        return None


def _check_precision(path: Path, attrs: Any, recipe: EmbeddingRecipe,
                     partial: bool = False) -> None:  # fmt: skip
    """Raise :class:`PrecisionMismatchError` when the store's recipe is ``recipe`` in all but
    precision (a legacy store's precision inferred from its device, see
    :func:`~napari_gpfm.embeddings.recipe.legacy_precision`); stores of another recipe are
    left to the caller's own rules."""
    if recipe.precision is None:
        return
    stored = _stored_recipe(attrs)
    if stored is None:
        return
    stored = stored.with_legacy_precision()
    diff = stored.diff(recipe)
    if set(diff) == {"precision"}:
        raise PrecisionMismatchError(path, stored.precision, recipe.precision, partial=partial)


def _resumable(ro: h5py.File, recipe: EmbeddingRecipe, coords: np.ndarray,
               embed_dim: int) -> tuple[int, int, int] | None:  # fmt: skip
    """``(rows to resume at, checksum blocks kept, non-finite rows in them)`` for a partial
    file opened read-only, or ``None`` when it cannot be resumed (other recipe, coords or dim;
    no checksums; damaged metadata)."""
    a = ro.attrs
    stored = _stored_recipe(a)
    same_recipe = a.get("gpfm_recipe_key") == recipe.key() or (
        stored is not None and stored.with_legacy_precision().key() == recipe.key()
    )  # a store that records no precision but its device: what that device computed in
    if not (
        same_recipe
        and "features" in ro
        and "coords" in ro
        and CHECKSUM_DATASET in ro
        and ro["features"].shape == (len(coords), embed_dim)
        and np.array_equal(ro["coords"][()], coords)
        and 0 <= int(a.get("gpfm_n_done", -1)) <= len(coords)
    ):
        return None
    if "gpfm_meta_sha256" in a and _decoded(a["gpfm_meta_sha256"]) != meta_digest(a):
        return None
    n_done = int(a["gpfm_n_done"])
    table = np.asarray(ro[CHECKSUM_DATASET][()], dtype=np.uint64).reshape(-1, 5)
    # the blocks that cover 0..n_done in order (later ones were never counted as done)
    keep = 0
    pos = 0
    while keep < len(table) and int(table[keep, 0]) == pos and int(table[keep, 1]) <= n_done:
        pos = int(table[keep, 1])
        keep += 1
    if keep:
        feats = np.asarray(ro["features"][:pos], dtype=np.float32)
        bad = _bad_blocks(feats, table[:keep])
        if bad:
            keep = bad[0]
            pos = int(table[keep, 0]) if keep else 0
    nonfinite = int(table[:keep, 2].sum()) if keep else 0
    return pos, keep, nonfinite


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureStore:
    """A feature file opened for reading: ours (``kind="gpfm"``) or another tool's.

    Attributes:
        path: the file.
        kind: ``"gpfm"``, ``"trident"`` (TRIDENT-style h5 without our attrs), ``"clam"``
            (CLAM ``h5_files/*.h5``) or ``"clam-pt"`` (CLAM ``pt_files/*.pt``).
        coords: (N, 2) int64 level-0 top-left x, y, or ``None`` (a ``.pt`` without its h5).
        attrs: root attrs merged with the ``coords`` attrs (TRIDENT stores them there).
        recipe: our recipe, ``None`` for external files (recipe unknown).
        patch_size_source: where :attr:`patch_size_level0` comes from: ``"file"`` (recorded),
            ``"user"`` (given to :func:`open_store`), ``"inferred from the coordinate grid"``
            (CLAM files record none), or ``None`` (unknown: no coords, or not inferable).
    """

    path: Path
    kind: str
    coords: np.ndarray | None
    attrs: dict[str, Any] = field(default_factory=dict)
    recipe: EmbeddingRecipe | None = None
    _features: np.ndarray | None = field(default=None, repr=False)
    patch_size_source: str | None = None
    _patch_size: int | None = field(default=None, repr=False)
    _patch_size_problem: str | None = field(default=None, repr=False)

    @property
    def is_external(self) -> bool:
        """True for files made by other tools: readable, but their recipe is unknown."""
        return self.kind != "gpfm"

    @property
    def checksummed(self) -> bool:
        """True when the file records checksums of its features and coords (stores written by
        napari-gpfm since they exist): coords are checked at open, features on first read."""
        return self.kind == "gpfm" and "gpfm_checksum" in self.attrs

    @property
    def features(self) -> np.ndarray:
        """(N, D) float32 features, read on first access.

        Checksummed stores are verified on that read (:func:`wsum64` of the coords and of each
        written chunk): damaged coords or features raise :class:`DamagedStoreError` naming the
        store and what is damaged, and are never returned.
        """
        if self._features is None:
            table = None
            try:
                with h5py.File(self.path, "r") as f:
                    feats = np.asarray(f["features"][()], dtype=np.float32)
                    if self.checksummed:
                        table = np.asarray(f[CHECKSUM_DATASET][()], dtype=np.uint64)
            except BlockingIOError as e:
                raise _locked(self.path) from e
            except Exception as e:
                raise _damaged(self.path, f"its features cannot be read ({e})") from e
            if self.checksummed:
                _verify_features(self.path, feats, table, self.coords, self.attrs)
            self._features = feats
        return self._features

    def verify(self) -> FeatureStore:
        """Check the coords and features against their checksums now (reads the features;
        :class:`DamagedStoreError` naming what is damaged); returns the store."""
        self.features
        return self

    def require_finite(self) -> None:
        """Raise :class:`NonFiniteFeaturesError` (naming this file and counting the rows) when
        the features hold NaN or inf. Free for checksummed stores: their writer refused to
        finish with any, and the checksums prove the file unchanged since."""
        feats = self.features
        if self.checksummed and int(self.attrs.get("gpfm_n_nonfinite", 0) or 0) == 0:
            return
        check_finite(feats, self.path)

    @property
    def n_patches(self) -> int:
        if self.coords is not None:
            return int(self.coords.shape[0])
        return int(self.features.shape[0])

    @property
    def embed_dim(self) -> int:
        if self._features is not None:
            return int(self._features.shape[1])
        try:
            with h5py.File(self.path, "r") as f:
                return int(f["features"].shape[1])
        except Exception as e:
            raise _damaged(self.path, f"its features cannot be read ({e})") from e

    @property
    def model(self) -> str | None:
        """Encoder name (ours, or TRIDENT's ``features.attrs['encoder']``), if recorded."""
        return self.attrs.get("gpfm_model") or self.attrs.get("encoder") or None

    @property
    def slide_name(self) -> str:
        name = self.attrs.get("name")
        return str(name) if name else os.path.splitext(self.path.name)[0]

    @property
    def slide_fingerprint(self) -> SlideFingerprint | None:
        """The fingerprint of the slide the features were computed from (``None`` when the
        file records none: older stores, other tools)."""
        text = self.attrs.get("gpfm_slide_fingerprint")
        if not text:
            return None
        try:
            return SlideFingerprint.from_json(text)
        except ValueError:
            return None

    @property
    def slide_path(self) -> str | None:
        """Absolute path of the slide when the features were written, if recorded."""
        return self.attrs.get("gpfm_slide_path") or None

    @property
    def patch_size_level0(self) -> int | None:
        """Patch side in level-0 px: recorded, given, or inferred (see ``patch_size_source``);
        ``None`` without coords.

        Raises:
            StoreError: the file records none and its coordinate grid does not tell it (one
                patch; x and y strides differ): the message says so and how to give it.
        """
        if self._patch_size is not None:
            return self._patch_size
        v = self.attrs.get("patch_size_level0")
        if v is None and self._patch_size_problem:
            raise StoreError(self.path, self._patch_size_problem)
        return None if v is None else int(v)

    @property
    def precision(self) -> str | None:
        """"fp32", "fp16" or "bf16" the features were computed in; for a store made before
        precision was recorded, inferred from its recorded device when it has one
        (:func:`~napari_gpfm.embeddings.recipe.legacy_precision`); else ``None`` (unknown)."""
        if self.recipe is None:
            return None
        return self.recipe.with_legacy_precision().precision

    @property
    def mpp(self) -> float | None:
        """Level-0 µm/px used (ours), else derived from ``level0_magnification`` if present."""
        if "gpfm_mpp" in self.attrs:
            return float(self.attrs["gpfm_mpp"])
        mag = self.attrs.get("level0_magnification")
        return 10.0 / float(mag) if mag else None

    def describe(self) -> str:
        """One line for logs and the UI, flagging external files."""
        n = self.n_patches
        if self.is_external:
            return f"{self.path.name}: {n} patches, {self.kind} file (external: recipe unknown)"
        assert self.recipe is not None
        return (
            f"{self.path.name}: {n} patches, model {self.recipe.model}, "
            f"{self.recipe.patch_size} px at {self.recipe.target_mpp} µm/px, "
            f"{self.precision or 'precision unknown'}, key {self.recipe.key()}"
        )


def _h5_attrs(obj: Any) -> dict[str, Any]:
    return {k: _decoded(v) for k, v in obj.attrs.items()}


PATCH_SIZE_FILE = "file"
PATCH_SIZE_USER = "user"
PATCH_SIZE_INFERRED = "inferred from the coordinate grid"


def _grid_stride(values: np.ndarray) -> int | None:
    """The most common positive difference between the sorted unique values (None: one value)."""
    u = np.unique(values)
    if u.size < 2:
        return None
    steps, counts = np.unique(np.diff(u), return_counts=True)
    return int(steps[counts.argmax()])  # ties: the smallest


def infer_patch_size(coords: np.ndarray, path: str | Path) -> int:
    """Level-0 patch side of a grid of patches that do not overlap: its stride.

    The stride is the most common positive difference between the sorted unique x's (and the
    same for y). Raises :class:`StoreError` when x and y strides differ or there is only one
    patch position.
    """
    c = np.asarray(coords).reshape(-1, 2)
    sx, sy = _grid_stride(c[:, 0]), _grid_stride(c[:, 1])
    how = "give the patch size when opening it (open_store(..., patch_size_level0=...))"
    if sx is None and sy is None:
        raise StoreError(
            path,
            f"records no patch_size_level0 and has {'only one patch' if len(c) else 'no patches'}"
            f", so the patch size cannot be inferred from the coordinate grid; {how}",
        )
    if sx is not None and sy is not None and sx != sy:
        raise StoreError(
            path,
            f"records no patch_size_level0 and its coordinate grid has an x stride of {sx} px "
            f"but a y stride of {sy} px, so the patch size cannot be inferred; {how}",
        )
    return int(sx if sx is not None else sy)


def _resolve_patch_size(
    path: Path, attrs: dict[str, Any], coords: np.ndarray | None, given: int | None,
    coords_file: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """FeatureStore fields: the patch size to use when the file records none, where the patch
    size comes from, and why it cannot be inferred (raised when it is asked for)."""
    recorded = attrs.get("patch_size_level0")
    if recorded is not None and str(recorded) != "":
        if given is not None and int(given) != int(recorded):
            raise StoreError(
                path,
                f"records patch_size_level0 = {int(recorded)} px but {int(given)} px was given",
            )
        return {"patch_size_source": PATCH_SIZE_FILE}
    if given is not None:
        if int(given) <= 0:
            raise StoreError(path, f"patch_size_level0 must be positive, got {given}")
        return {"_patch_size": int(given), "patch_size_source": PATCH_SIZE_USER}
    if coords is None:
        return {}
    where = "" if coords_file in (None, path) else f" (coordinates from {coords_file})"
    try:
        size = infer_patch_size(coords, path)
    except StoreError as e:  # the features stay readable; asking for the patch size raises
        problem = e.problem.replace("patch_size_level0", "patch_size_level0" + where, 1)
        return {"_patch_size_problem": problem}
    warnings.warn(
        f"{path}: the file records no patch_size_level0; inferred {size} px from the "
        f"coordinate grid{where}, assuming patches that touch without overlapping. Pass "
        "patch_size_level0 to open_store if that is wrong.",
        InferredPatchSizeWarning,
        stacklevel=4,
    )
    return {"_patch_size": size, "patch_size_source": PATCH_SIZE_INFERRED}


def _read_coords(f: h5py.File) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(coords (N, 2) int64 or None, root attrs merged with the coords attrs) of an open file."""
    attrs = _h5_attrs(f)
    coords = None
    if "coords" in f:
        for k, v in _h5_attrs(f["coords"]).items():
            attrs.setdefault(k, v)
        coords = np.asarray(f["coords"][()]).astype(np.int64).reshape(-1, 2)
    return coords, attrs


def _verify_features(path: Path, feats: np.ndarray, table: np.ndarray | None,
                     coords: np.ndarray | None = None,
                     attrs: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Raise :class:`DamagedStoreError` unless every block of ``feats`` matches the checksum
    table of the store at ``path`` (and ``coords`` both sums recorded in ``attrs``)."""
    if coords is not None and attrs is not None:
        if wsum64(coords) != _coords_checksum(path, attrs):
            raise _damaged(path, _COORDS_DAMAGED)
    if table is None:
        raise _damaged(path, f"its checksum table '{CHECKSUM_DATASET}' is missing")
    table = table.reshape(-1, 5) if table.size % 5 == 0 else table
    problem = _table_problem(table, feats.shape[0])
    if problem:
        raise _damaged(path, problem)
    bad = _bad_blocks(feats, table)
    if bad:
        raise _damaged(
            path,
            f"the features of {_describe_blocks(table, bad)} do not match their checksums "
            "(bit rot, a bad copy, or an edit)",
        )


def _damaged(path: Path, what: str) -> DamagedStoreError:
    return DamagedStoreError(
        path,
        f"damaged: {what}. Re-embed the slide with --overwrite (overwrite=True) to replace "
        "this file (it is replaced only when the new one is complete)",
    )


def _read_h5(
    path: Path,
    expected_recipe: EmbeddingRecipe | None,
    expected_slide: Any = None,
    patch_size_level0: int | None = None,
) -> FeatureStore:
    try:
        f = h5py.File(path, "r")
    except BlockingIOError as e:
        raise _locked(path) from e
    except OSError as e:
        raise StoreError(path, f"not a readable HDF5 file ({e})") from e
    try:
        with f:
            if "features" not in f:
                raise StoreError(
                    path, f"no 'features' dataset (found: {', '.join(f.keys()) or 'nothing'})"
                )
            root = _h5_attrs(f)
            attrs = dict(root)
            coords = None
            if "coords" in f:
                for k, v in _h5_attrs(f["coords"]).items():
                    attrs.setdefault(k, v)
                coords = np.asarray(f["coords"][()]).astype(np.int64, copy=False).reshape(-1, 2)
            fds = f["features"]
            for k, v in _h5_attrs(fds).items():
                attrs.setdefault(k, v)
            shape = fds.shape
            has_table = CHECKSUM_DATASET in f
    except StoreError:
        raise
    except Exception as e:  # unreadable datasets or attributes: name the store, not the slide
        raise _damaged(path, f"its datasets or attributes cannot be read ({e})") from e
    if len(shape) != 2:
        raise _damaged(path, f"'features' has shape {shape}, expected (patches, dim)")
    n_feat = shape[0]

    if "gpfm_recipe_key" not in attrs:
        kind = "clam" if path.parent.name == "h5_files" else "trident"
        if coords is not None and coords.shape[0] != n_feat:
            raise StoreError(path, f"{n_feat} features but {coords.shape[0]} coords")
        if expected_slide is not None:
            check_slide(path, attrs, expected_slide)
        if expected_recipe is not None:
            warnings.warn(
                f"{path}: {kind} feature file from another tool; its recipe (model, mpp, tiling) "
                "is unknown and cannot be checked against the expected one",
                ExternalFeaturesWarning,
                stacklevel=3,
            )
        size = _resolve_patch_size(path, attrs, coords, patch_size_level0)
        return FeatureStore(path=path, kind=kind, coords=coords, attrs=attrs, **size)

    _check_metadata(path, root, attrs, coords, n_feat, has_table)
    try:
        recipe = EmbeddingRecipe.from_json(attrs["gpfm_recipe"])
    except Exception as e:
        raise _damaged(path, f"unreadable gpfm_recipe attribute ({e})") from e
    if expected_slide is not None:
        check_slide(path, attrs, expected_slide)
    if expected_recipe is not None:
        found = recipe.with_legacy_precision()
        if found.key() != expected_recipe.key():
            diff = found.diff(expected_recipe)
            if set(diff) == {"precision"} and expected_recipe.precision is not None:
                raise PrecisionMismatchError(path, found.precision, expected_recipe.precision)
            raise RecipeMismatchError(path, diff)
    size = _resolve_patch_size(path, attrs, coords, patch_size_level0)
    return FeatureStore(path=path, kind="gpfm", coords=coords, attrs=attrs, recipe=recipe, **size)


def _check_metadata(path: Path, root: dict[str, Any], attrs: dict[str, Any],
                    coords: np.ndarray | None, n_feat: int, has_table: bool) -> None:  # fmt: skip
    """Refuse one of our stores that is unfinished, or whose metadata or coords are damaged
    (:class:`DamagedStoreError` saying what); the features are checked on first read."""
    try:
        n_total = int(attrs.get("gpfm_n_total", n_feat))
        n_done = int(attrs.get("gpfm_n_done", n_total))
        complete = attrs.get("gpfm_complete", False)
    except (TypeError, ValueError) as e:
        raise _damaged(path, f"unreadable patch counters gpfm_n_total/gpfm_n_done ({e})") from e
    if not isinstance(complete, (bool, np.bool_)):
        raise _damaged(path, f"gpfm_complete is {complete!r}, not true or false")
    if not bool(complete):
        if path.name.endswith(PARTIAL_SUFFIX):
            raise IncompleteStoreError(
                path,
                f"incomplete feature file ({n_done} of {n_total} patches embedded); run "
                "`napari-gpfm embed` again on the slide to resume it",
            )
        raise _damaged(
            path,
            f"it is marked unfinished ({n_done} of {n_total} patches) although it is not a "
            f"{PARTIAL_SUFFIX} file: a finished store is renamed only when complete, so its "
            "gpfm_complete/gpfm_n_done attributes were damaged or edited (rerunning embed "
            "cannot resume it)",
        )
    if coords is None:
        raise _damaged(path, "it has no 'coords' dataset")
    if not (coords.shape[0] == n_feat == n_total) or n_done != n_total:
        raise _damaged(
            path,
            f"its sizes disagree: {n_feat} features, {coords.shape[0]} coords, "
            f"gpfm_n_total {n_total}, gpfm_n_done {n_done}",
        )
    _check_integrity(path, root, coords, has_table)


def _check_integrity(path: Path, root: dict[str, Any], coords: np.ndarray,
                     has_table: bool) -> None:  # fmt: skip
    """The checks :func:`open_store` adds for checksummed stores: the metadata digest and the
    presence of the checksums (the coords and features themselves are verified on the first
    read of the features, :attr:`FeatureStore.features`). Cost: ~0.02 ms, whatever the number
    of patches (``bench/bench_store_integrity.py``)."""
    if "gpfm_meta_sha256" in root and str(root["gpfm_meta_sha256"]) != meta_digest(root):
        raise _damaged(
            path,
            "its metadata (recipe, tiling, slide fingerprint or patch count attributes) does "
            "not match the digest written with it (gpfm_meta_sha256): edited or corrupted",
        )
    if "gpfm_checksum" not in root:  # written before checksums existed: nothing to check
        return
    if root["gpfm_checksum"] != CHECKSUM_ALGO:
        raise StoreError(path, f"unknown checksum {root['gpfm_checksum']!r} (expected "
                               f"{CHECKSUM_ALGO}); written by a newer napari-gpfm?")  # fmt: skip
    if not has_table:
        raise _damaged(path, f"its checksum table '{CHECKSUM_DATASET}' is missing")
    _coords_checksum(path, root)  # present and well-formed; compared on the first read


_COORDS_DAMAGED = "its coords do not match their checksum (patch positions changed)"


def _coords_checksum(path: Path, attrs: dict[str, Any]) -> tuple[int, int]:
    recorded = np.asarray(attrs.get("gpfm_coords_checksum", []), dtype=np.uint64).reshape(-1)
    if recorded.size != 2:
        raise _damaged(path, "its gpfm_coords_checksum attribute is missing or malformed")
    return int(recorded[0]), int(recorded[1])


def _numpy_safe_globals() -> list:
    """Exactly what unpickling a numpy float array needs (numpy 1.x and 2.x pickles): the array
    reconstructor, ``ndarray``, ``dtype`` and the float dtype classes. Nothing that can run code:
    an object array's elements still need their own globals, which stay refused."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed: list = [
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
    ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    for name in ("Float16DType", "Float32DType", "Float64DType"):
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append((getattr(dtypes, name), f"numpy.dtypes.{name}"))
    return allowed


def _safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` that also accepts a pickled numpy float array (TRIDENT
    writes its ``.pt`` features that way); the extra globals are allowed for this call only."""
    import torch

    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    allow = contextlib.nullcontext() if scoped is None else scoped(_numpy_safe_globals())
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        m = (
            re.search(r"(?i)unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", text)
            or re.search(r"but got <class '([\w.]+)'>", text)
            or re.search(r"Unsupported operand (\S+)", text)
        )
        if m:
            old = " (numpy arrays need torch >= 2.5)" if scoped is None else ""
            raise StoreError(
                path,
                f"refused by the safe loader: the file needs {m.group(1)}, which is not allowed "
                f"(a feature .pt may hold only tensors or numpy float arrays{old}); a file that "
                "needs more can run code when loaded, so it is not opened",
            ) from e
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise StoreError(path, f"not a loadable tensor file ({first})") from e


def _pt_coords(path: Path) -> tuple[Path | None, np.ndarray | None, dict[str, Any]]:
    """Coordinates of a ``.pt`` feature file from its siblings: CLAM's ``../h5_files/<stem>.h5``
    or TRIDENT's ``../patches/<stem>_patches.h5``."""
    for sibling in (
        path.parent.parent / "h5_files" / (path.stem + ".h5"),
        path.parent.parent / "patches" / (path.stem + "_patches.h5"),
    ):
        if not sibling.exists():
            continue
        try:
            with h5py.File(sibling, "r") as f:
                coords, attrs = _read_coords(f)
        except OSError:
            continue
        if coords is not None:
            return sibling, coords, attrs
    return None, None, {}


def _read_pt(
    path: Path, expected_slide: Any = None, patch_size_level0: int | None = None
) -> FeatureStore:
    import torch

    obj = _safe_torch_load(path)
    if isinstance(obj, dict) and "features" in obj:
        obj = obj["features"]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind != "f":
            raise StoreError(path, f"expected float features, got a {obj.dtype} array")
        kind, feats = "trident-pt", np.asarray(obj, dtype=np.float32)
    elif isinstance(obj, torch.Tensor):
        kind, feats = "clam-pt", obj.detach().to(torch.float32).numpy()
    else:
        raise StoreError(path, f"expected a 2-D (N, D) feature tensor, got {type(obj).__name__}")
    if feats.ndim != 2:
        raise StoreError(path, f"expected a 2-D (N, D) feature tensor, got shape {feats.shape}")
    coords = None
    attrs: dict[str, Any] = {}
    sibling, c, a = _pt_coords(path)
    if c is not None and c.shape[0] == feats.shape[0]:
        coords, attrs = c, a
    if expected_slide is not None:
        check_slide(path, attrs, expected_slide)
    size = _resolve_patch_size(path, attrs, coords, patch_size_level0, sibling)
    return FeatureStore(path=path, kind=kind, coords=coords, attrs=attrs, _features=feats, **size)


def open_store(
    path: str | Path,
    expected_recipe: EmbeddingRecipe | None = None,
    *,
    expected_slide: Any = None,
    patch_size_level0: int | None = None,
) -> FeatureStore:
    """Open a feature file for reading, refusing ones that cannot be trusted.

    Accepts our files, TRIDENT files (``.h5``, and ``.pt`` holding a numpy array, with coords
    from ``../patches/<slide>_patches.h5``), CLAM ``h5_files/*.h5`` and ``pt_files/*.pt``, at any
    path. ``.pt`` files are loaded with ``weights_only=True``; only tensors and numpy float
    arrays are allowed in them.

    Patch size: a file that records no ``patch_size_level0`` (CLAM) takes ``patch_size_level0``
    when given, else it is inferred from the grid stride of its coords with an
    :class:`InferredPatchSizeWarning` naming the file and the value
    (``store.patch_size_source`` says which). When it cannot be inferred (one patch; x and y
    strides differ) the file still opens and ``store.patch_size_level0`` raises
    :class:`StoreError` saying so; a given value that contradicts the recorded one is refused
    here.

    Raises :class:`IncompleteStoreError` for an unfinished run (including when only
    ``<path>.partial`` exists), :class:`SlideMismatchError` when ``expected_slide`` (a
    :class:`~napari_gpfm.slide.Slide` or :class:`~napari_gpfm.slide.SlideFingerprint`) is given
    and the features were computed from another file (see :func:`check_slide`),
    :class:`RecipeMismatchError` (listing the differing fields) when ``expected_recipe`` is given
    and differs, and :class:`StoreError` for unreadable files. External files open with
    ``recipe=None``; with ``expected_recipe`` they also warn (:class:`ExternalFeaturesWarning`).
    """
    path = Path(path)
    if not path.exists():
        part = partial_path(path)
        if part.exists():
            raise IncompleteStoreError(
                path,
                f"not finished yet: only the unfinished {part.name} exists; run "
                "`napari-gpfm embed` again on the slide to resume it",
            )
        raise StoreError(path, "no such feature file")
    if path.suffix == ".pt":
        return _read_pt(path, expected_slide, patch_size_level0)
    return _read_h5(path, expected_recipe, expected_slide, patch_size_level0)


def find_store(out_dir: str | Path, slide: Any, recipe: EmbeddingRecipe) -> FeatureStore | None:
    """The finished store of ``slide`` under ``recipe`` in ``out_dir``, or ``None`` if there is
    none yet (nothing, or only an unfinished ``.partial``, at :func:`recipe_store_path`).

    Never returns a wrong store: raises :class:`SlideMismatchError` when the store there was
    computed from another file of the same name, :class:`RecipeMismatchError` when it has another
    recipe (same tiling, other model weights or tissue settings; :class:`PrecisionMismatchError`
    when only the precision differs, or the store records none and no device), and
    :class:`StoreError` when the file there is unreadable or was not written by napari-gpfm
    (recipe unknown).
    """
    path = recipe_store_path(out_dir, recipe, slide.name)
    if not path.exists():
        return None
    store = open_store(path, expected_slide=slide)
    if store.is_external:
        raise StoreError(
            path,
            f"already exists and was not written by napari-gpfm ({store.kind} file); "
            "use --overwrite (overwrite=True) to replace it or choose another output folder",
        )
    assert store.recipe is not None
    found = store.recipe.with_legacy_precision()
    if found.key() != recipe.key():
        diff = found.diff(recipe)
        if set(diff) == {"precision"}:
            raise PrecisionMismatchError(path, found.precision, recipe.precision or "fp32")
        raise RecipeMismatchError(path, diff)
    return store
