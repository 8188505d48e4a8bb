"""Embed a slide, or load its finished store: the job behind the GPFM dock, the demo and the CLI.

:func:`embed_or_load` is a generator of :class:`~napari_gpfm.jobs.Progress` records whose return
value is an :class:`EmbedOutcome` (the store, its features read and its similarity index
built, so the caller's thread has nothing heavy left). Stages, in order: "looking for a
finished store" (no model is built for that: the weights' digest is cached by path, size and
mtime, in this process and on disk for the next one, see :func:`weights_digest`), "loading
model", "detecting tissue", "embedding" (patches; the cancel points), "indexing" (only with
``EmbedRequest.index``). Closing the generator cancels the run and leaves a resumable store.

The ``napari-gpfm embed`` command (:mod:`napari_gpfm.jobs._cli`) drives the same generator with
``index=False``: re-running it over an embedded cohort finds every store without building the
model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .progress import Progress

__all__ = [
    "EmbedOutcome",
    "EmbedRequest",
    "digest_cache_path",
    "embed_or_load",
    "find_store_for",
    "require_weights",
    "weights_digest",
]

JOB = "embed"

#: Encoders built in this process, by (model, device, allow_random, explicit weights file): a
#: second run reuses one.
_ENCODERS: dict[tuple[str, str, bool, str | None], Any] = {}
#: Weights digests computed or read in this process, by :func:`_file_key`.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}

#: The persistent digest cache: ``$NAPARI_GPFM_CACHE_DIR/weights-digests.json``, by default
#: ``~/.cache/napari-gpfm/weights-digests.json``.
CACHE_DIR_ENV = "NAPARI_GPFM_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/napari-gpfm"
DIGEST_CACHE_FILE = "weights-digests.json"
_CACHE_VERSION = 1
_CACHE_MAX_ENTRIES = 128
_CACHE_MAX_BYTES = 1 << 20  # a valid cache of 128 entries is ~40 KB: larger is not ours
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class EmbedRequest:
    """Everything an embed run needs (plain data, gathered on the caller's thread).

    ``slide`` is an open :class:`~napari_gpfm.slide.Slide` (an mpp override is applied when it is
    opened: ``open_slide(path, mpp=...)``); the caller closes it. ``weights`` is an explicit
    weights file (else the card's); ``index=False`` skips reading the features and building the
    similarity index (the outcome's ``index`` is then ``None``). ``precision`` is ``"auto"``
    (fp16 on CUDA, fp32 elsewhere), ``"fp32"``, ``"fp16"`` or ``"bf16"``: the resolved value is
    part of the recipe, so a store of another precision is not this request's store.
    ``batch_size`` is a number, ``"auto"`` (from free GPU memory on CUDA) or ``None`` (the
    dock's small CPU batches, ``"auto"`` on CUDA); ``compile`` runs the network through
    ``torch.compile``.
    """

    slide: Any
    model: str
    spec: Any
    tissue_params: Any
    out_dir: Path
    device: str = "auto"
    allow_random: bool = False
    batch_size: int | str | None = None
    num_workers: int | None = None
    overwrite: bool = False
    weights: str | None = None
    index: bool = True
    max_patches: int | None = 2_000_000  # refuse larger grids (tiles.grid.DEFAULT_MAX_PATCHES)
    precision: str = "auto"
    compile: bool = False


@dataclass(frozen=True)
class EmbedOutcome:
    """A finished store ready for analysis; ``loaded`` when it existed before the run;
    ``index`` is ``None`` when the request asked for none."""

    store: Any
    index: Any
    loaded: bool


def weights_digest(card: Any, allow_random: bool = False, seed: int = 0,
                   weights: str | Path | None = None) -> str | None:  # fmt: skip
    """The ``weights_sha256`` a run with ``card`` would record, without loading the model.

    An explicit ``weights`` file: its sha256 (``None`` when it is not a file; loading would
    refuse it). Else the card's recorded sha256 when known, else the found file's,
    ``random-init-seed-<seed>`` for random weights, ``None`` when no weights exist.

    A file is hashed once per file version: digests are kept in this process and in
    :func:`digest_cache_path` (a small JSON file shared by every process) by the file's
    resolved path, size, mtime and ctime (``st_ctime_ns``: it changes whenever the file's
    content or metadata is written, so a file rewritten with its old size and mtime put back is
    hashed again). A new ``napari-gpfm embed`` process re-running over a finished cohort thus
    reads no weights at all. The cache only maps a file version to its digest: an entry that is
    malformed, or whose file has changed since, is never used, and an unreadable cache file is
    ignored (and replaced on the next write).
    """
    if weights is not None:
        path = Path(weights).expanduser()
        return _file_digest(path) if path.is_file() else None
    status = card.status()
    if not status.found:
        return f"random-init-seed-{seed}" if allow_random else None
    if card.weights.sha256:
        return str(card.weights.sha256)
    return _file_digest(Path(status.path))


def digest_cache_path() -> Path:
    """``$NAPARI_GPFM_CACHE_DIR/weights-digests.json``, by default
    ``~/.cache/napari-gpfm/weights-digests.json`` (may not exist)."""
    base = os.environ.get(CACHE_DIR_ENV, "").strip() or DEFAULT_CACHE_DIR
    return Path(base).expanduser() / DIGEST_CACHE_FILE


def _file_key(path: Path) -> tuple[str, int, int, int]:
    """(resolved path, size, mtime_ns, ctime_ns): one version of one file."""
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns)


def _file_digest(path: Path) -> str:
    key = _file_key(path)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = _read_cache().get(key)
    if digest is None:
        from ..encoders import sha256_file

        digest = sha256_file(key[0])
        if _file_key(path) != key:  # written to while hashed: that digest describes no version
            return digest
        _write_cache(key, digest)
    _DIGESTS[key] = digest
    return digest


def _valid_entry(path: Any, entry: Any) -> tuple[tuple[str, int, int, int], str] | None:
    """``(key, digest)`` of one cache entry, or ``None`` when anything in it is malformed."""
    if not isinstance(path, str) or not os.path.isabs(path) or not isinstance(entry, dict):
        return None
    fields = [entry.get(k) for k in ("size", "mtime_ns", "ctime_ns")]
    if not all(type(v) is int and v >= 0 for v in fields):  # bool is not int here
        return None
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        return None
    return (path, *fields), digest  # type: ignore[return-value]


def _read_cache() -> dict[tuple[str, int, int, int], str]:
    """The valid entries of the persistent cache (empty when it is missing or unreadable)."""
    try:
        with open(digest_cache_path(), "rb") as handle:
            raw = handle.read(_CACHE_MAX_BYTES + 1)
        if len(raw) > _CACHE_MAX_BYTES:
            return {}
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    out = {}
    for path, entry in entries.items():
        valid = _valid_entry(path, entry)
        if valid is not None:
            out[valid[0]] = valid[1]
    return out


def _write_cache(key: tuple[str, int, int, int], digest: str) -> None:
    """Add ``key -> digest`` to the persistent cache, atomically (a temporary file renamed over
    it). Entries of files that are gone or have changed are dropped, one entry per path, at most
    ``_CACHE_MAX_ENTRIES`` (the oldest go first). The cache is only a shortcut: failing to write
    it (read-only home, full disk) is not an error."""
    merged = {}
    for (path, *version), value in _read_cache().items():  # fresh: keep other processes' entries
        if path == key[0]:
            continue
        try:
            current = _file_key(Path(path))
        except OSError:
            continue
        if current == (path, *version):
            merged[path] = value, version
    merged[key[0]] = digest, list(key[1:])
    items = list(merged.items())[-_CACHE_MAX_ENTRIES:]
    entries = {path: {"size": v[0], "mtime_ns": v[1], "ctime_ns": v[2], "sha256": d}
               for path, (d, v) in items}  # fmt: skip
    text = json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1)
    target = digest_cache_path()
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def require_weights(card: Any, weights: str | Path | None = None,
                    allow_random: bool = False) -> str:  # fmt: skip
    """:func:`weights_digest`, raising the ``WeightsNotFoundError`` that loading the model would
    raise (a missing explicit file, or no weights and no ``allow_random``): a command checks its
    model before any slide, without building it."""
    digest = weights_digest(card, allow_random, weights=weights)
    if digest is None:
        from ..encoders import WeightsNotFoundError

        if weights is not None:
            raise WeightsNotFoundError(f"{Path(weights).expanduser()}: the weights file given "
                                       f"for model '{card.name}' does not exist.")  # fmt: skip
        raise WeightsNotFoundError(card.missing_weights_message())
    return digest


def find_store_for(slide: Any, card: Any, spec: Any, tissue_params: Any, out_dir: str | Path,
                   allow_random: bool = False, weights: str | Path | None = None,
                   precision: str = "auto", device: str = "auto") -> Any | None:  # fmt: skip
    """The finished store of ``slide`` under exactly this recipe, or ``None`` (no model load).
    ``precision`` is resolved on ``device`` as the run would (``"auto"``: fp16 on CUDA, fp32
    elsewhere).

    Raises :class:`~napari_gpfm.embeddings.SlideMismatchError` when the store there was made
    from another file with the same name, and ``RecipeMismatchError`` when it has another
    recipe (``PrecisionMismatchError`` when only its precision differs, or it records none; the
    caller decides whether to overwrite)."""
    from ..embeddings import find_store
    from ..embeddings.run import make_recipe
    from ..embeddings.tiling import spec_for_slide

    digest = weights_digest(card, allow_random, weights=weights)
    if digest is None or slide.mpp is None:
        return None
    spec = spec_for_slide(spec, slide)
    recipe = make_recipe(SimpleNamespace(card=card, weights_sha256=digest), slide, spec,
                         tissue_params, precision=precision, device=device)  # fmt: skip
    return find_store(out_dir, slide, recipe)


def _encoder(req: EmbedRequest, dev: str) -> Any:
    from ..encoders import load_encoder

    weights = str(Path(req.weights).expanduser().resolve()) if req.weights is not None else None
    key = (req.model, dev, req.allow_random, weights)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_encoder(req.model, weights=weights, device=dev,
                                      allow_random=req.allow_random)  # fmt: skip
    return _ENCODERS[key]


def batch_size_for(card: Any, device: str) -> int | str:
    """Small CPU batches keep Cancel prompt (a batch is the cancel granularity); on CUDA
    ``"auto"``: sized from the free GPU memory when the run starts."""
    if device.startswith("cuda"):
        return "auto"
    from ..embeddings.pipeline import cpu_batch_size

    return cpu_batch_size(card.embed_dim)


def embed_or_load(req: EmbedRequest) -> Generator[Progress, None, EmbedOutcome]:
    """Load the slide's finished store for this recipe, or embed the slide (resuming a partial
    store); see the module docstring for the stages."""
    from ..embeddings import open_store
    from ..encoders import get_card, resolve_device, resolve_precision

    name = req.slide.name
    yield Progress(JOB, "looking for a finished store", status="started",
                   message=f"{name}: looking for a finished feature file…")  # fmt: skip
    card = get_card(req.model)
    req.slide.require_mpp()
    dev = str(resolve_device(req.device))
    precision = resolve_precision(req.precision, dev)
    if not req.overwrite:
        store = find_store_for(req.slide, card, req.spec, req.tissue_params, req.out_dir,
                               req.allow_random, req.weights, precision, dev)  # fmt: skip
        if store is not None:
            yield Progress(JOB, "loading features", store.n_patches, store.n_patches,
                           status="skipped", unit="patches",
                           message=f"{name}: found a finished feature file with the same "
                                   f"recipe: {store.path}")  # fmt: skip
            return _outcome(store, loaded=True, index=req.index)
    yield Progress(JOB, "loading model", status="note",
                   message=f"{name}: loading {card.display_name} on {dev} ({precision})…")
    encoder = _encoder(req, dev)
    yield Progress(JOB, "detecting tissue", status="note",
                   message=f"{name}: detecting tissue and laying out patches…")  # fmt: skip
    path = yield from _embed(req, encoder, card, dev, precision)
    if req.index:
        yield Progress(JOB, "indexing", status="note", message=f"{name}: reading the features…")
    return _outcome(open_store(path, expected_slide=req.slide), loaded=False, index=req.index)


def _embed(req: EmbedRequest, encoder: Any, card: Any, dev: str,
           precision: str) -> Generator[Progress, None, Path]:  # fmt: skip
    from ..embeddings import embed_slide

    gen = embed_slide(
        req.slide, encoder, req.spec, req.out_dir,
        tissue_params=req.tissue_params,
        batch_size=req.batch_size or batch_size_for(card, dev),
        num_workers=req.num_workers, device=dev, overwrite=req.overwrite,
        max_patches=req.max_patches, precision=precision, compile=req.compile,
    )  # fmt: skip
    try:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                return stop.value
            yield _translate(req.slide.name, p)
    finally:
        gen.close()


def _translate(name: str, p: Any) -> Progress:
    status = {"started": "started", "running": "running", "done": "done"}.get(p.status, "running")
    if p.status == "started":
        msg = (f"{name}: resuming at {p.done:,} / {p.total:,} patches…" if p.done
               else f"{name}: embedding {p.total:,} patches…")  # fmt: skip
    elif p.status == "skipped":
        msg = f"{name}: already embedded ({p.total:,} patches)"
        status = "skipped"
    else:
        msg = f"{name}: {p.done:,} / {p.total:,} patches"
    return Progress(JOB, "embedding", p.done, p.total, p.rate or None, p.eta_s, status, msg,
                    "patches", data=p)  # fmt: skip


def _outcome(store: Any, loaded: bool, index: bool = True) -> EmbedOutcome:
    if not index:
        return EmbedOutcome(store, None, loaded)
    from ..analyses.similarity import SimilarityIndex

    index = SimilarityIndex(store.features, model=store.model, name=store.slide_name)
    return EmbedOutcome(store, index, loaded)


def preview_job(slide: Any, spec: Any, tissue_params: Any, encoder_input: int | None = None
                ) -> Generator[Progress, None, tuple[Any, Any]]:  # fmt: skip
    """Tissue mask and the patch grid an embed run would use: returns ``(TissueMask,
    TileGrid)``; raises ``NoTissueError`` (naming the slide) when there is no tissue."""
    from ..embeddings.tiling import spec_for_slide
    from ..tiles import NoTissueError, detect_tissue, make_grid
    from ..tiles.tissue import no_tissue_message

    spec = spec_for_slide(spec, slide)
    yield Progress("preview", "detecting tissue", status="started",
                   message=f"{slide.name}: detecting tissue…")  # fmt: skip
    tissue = detect_tissue(slide, tissue_params)
    if tissue.is_empty:
        raise NoTissueError(no_tissue_message(slide.path, tissue_params))
    yield Progress("preview", "laying out patches", status="note",
                   message=f"{slide.name}: laying out patches…")  # fmt: skip
    grid = make_grid(slide, spec, tissue, encoder_input=encoder_input)
    return tissue, grid
