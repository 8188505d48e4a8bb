"""Embed one slide into a feature file: slide → tissue → grid → loader → encoder → store.

:func:`embed_slide` is a generator yielding an :class:`EmbedProgress` record after every batch;
that ``yield`` is its cancel point. Closing the generator (or an exception, or a killed process)
leaves a resumable ``.partial`` store; the next call with the same recipe continues from the
last finished batch and produces features identical to an uninterrupted run.
:func:`embed` is the blocking convenience wrapper.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from napari_gpfm.encoders.device import device_label, resolve_device, resolve_precision
from napari_gpfm.errors import OutputWriteError, UsageError
from napari_gpfm.slide.errors import MissingMppError
from napari_gpfm.slide.identity import slide_fingerprint
from napari_gpfm.tiles.grid import (
    DEFAULT_MAX_PATCHES,
    PRESETS,
    GridSpec,
    level0_size,
    make_grid,
)
from napari_gpfm.tiles.loader import PatchDataset, available_cpus, default_num_workers, iter_batches

from .pipeline import BatchForward, auto_batch_size
from .tiling import spec_for_slide
from napari_gpfm.tiles.tissue import NoTissueError, TissueParams, detect_tissue, no_tissue_message

from .recipe import EmbeddingRecipe, current_versions
from .store import (
    PrecisionMismatchError,
    SlideMismatchError,
    StoreWriter,
    find_store,
    recipe_store_path,
)

__all__ = [
    "EmbedProgress",
    "cpu_threads_for",
    "default_spec",
    "embed",
    "embed_slide",
    "make_recipe",
    "resolve_batch_size",
    "resolve_device",
]

DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class EmbedProgress:
    """Progress of one slide.

    Attributes:
        slide: slide name.
        done: patches embedded so far (including those from a resumed run).
        total: patches in the grid.
        rate: patches per second in this run.
        eta_s: seconds left at the current rate (``None`` before the first batch).
        elapsed_s: seconds since this run started.
        status: ``"started"`` (before the first batch; ``done`` > 0 when resuming),
            ``"running"`` (after a batch), ``"done"`` (store finished), ``"skipped"`` (a
            finished store with the same recipe already existed).
        path: final store path.
    """

    slide: str
    done: int
    total: int
    rate: float
    eta_s: float | None
    elapsed_s: float
    status: str
    path: Path

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def cpu_threads_for(num_workers: int, cpus: int | None = None) -> int:
    """Torch intra-op threads on CPU while ``num_workers`` loader processes decode.

    Every available core, less one per worker up to a quarter of the cores: a worker is
    single-threaded and sleeps most of the time (decoding a patch costs a few percent of a ViT
    forward), so on a small machine reserving a whole core for it costs the model more than the
    overlap does (2 cores, 2 workers: 2 threads, as measured); on a large one, workers that
    share cores with a full set of OpenMP threads stall both (16 cores, 8 workers: 12 threads).
    ``num_workers=0``: the main process decodes between forwards, so the model takes all.
    """
    n = available_cpus() if cpus is None else max(1, int(cpus))
    return max(1, n - min(max(0, int(num_workers)), n // 4))


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encoder_input_size(encoder: Any) -> int | None:
    inp = getattr(getattr(encoder, "card", None), "input", None)
    size = getattr(inp, "size", None)
    if size is None and isinstance(inp, dict):
        size = inp.get("size")
    return int(size) if size else None


def _model_device(encoder: Any) -> torch.device | None:
    model = getattr(encoder, "model", None)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None


def default_spec(encoder: Any | None = None) -> GridSpec:
    """The encoder card's recommended tiling, else the ``gpfm-20x-224`` preset."""
    rec = getattr(getattr(encoder, "card", None), "recommended_tiles", None)
    if rec is not None and getattr(rec, "target_mpp", None) and getattr(rec, "patch_size", None):
        return GridSpec(target_mpp=float(rec.target_mpp), patch_size=int(rec.patch_size))
    return PRESETS["gpfm-20x-224"]


def make_recipe(
    encoder: Any, slide: Any, spec: GridSpec, tissue_params: TissueParams,
    precision: str | None = "auto", device: str | torch.device | None = None,
) -> EmbeddingRecipe:
    """The recipe embedding ``slide`` with ``encoder`` under ``spec`` would have.

    ``precision`` ("auto", "fp32", "fp16", "bf16") is resolved on ``device`` (``None``: the
    encoder's model's device when it has one, else ``"auto"``) and recorded resolved; the device
    is recorded too (not part of the key)."""
    if device is None:
        device = _model_device(encoder) or "auto"
    dev = resolve_device(device)
    mpp = slide.mpp
    if mpp is None:
        raise MissingMppError(slide.path, "embedding at an exact physical patch size")
    in_size = spec.out_size(_encoder_input_size(encoder))
    return EmbeddingRecipe(
        model=str(encoder.card.name),
        weights_sha256=getattr(encoder, "weights_sha256", None),
        mpp=float(mpp),
        mpp_source=getattr(slide, "mpp_source", None),
        target_mpp=float(spec.target_mpp),
        patch_size=int(spec.patch_size),
        input_size=int(in_size),
        patch_size_level0=level0_size(spec.patch_size, spec.target_mpp, float(mpp)),
        overlap=int(spec.overlap),
        min_tissue=float(spec.min_tissue),
        tissue_params=tissue_params.to_dict(),
        versions=current_versions(),
        precision=resolve_precision(precision, dev),
        device=device_label(dev),
    )


def _open(slide_or_path: Any, mpp: float | None, opener: Callable[..., Any] | None) -> Any:
    if isinstance(slide_or_path, (str, Path)):
        if opener is not None:
            return opener(slide_or_path, mpp)
        from napari_gpfm.slide import open_slide

        return open_slide(slide_or_path, mpp=mpp)
    slide = slide_or_path
    if mpp is not None:
        slide = slide.with_mpp(mpp)
    return slide


def embed_slide(
    slide_or_path: Any,
    encoder: Any,
    spec: GridSpec | None = None,
    out_dir: str | Path = ".",
    *,
    tissue_params: TissueParams | None = None,
    batch_size: int | str = DEFAULT_BATCH_SIZE,
    num_workers: int | None = None,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    mpp: float | None = None,
    opener: Callable[..., Any] | None = None,
    torch_threads: int | None = None,
    max_patches: int | None = DEFAULT_MAX_PATCHES,
    precision: str | None = "auto",
    compile: bool = False,
    pipeline_depth: int | None = None,
) -> Generator[EmbedProgress, None, Path]:
    """Embed a slide into ``<out_dir>/<tiling>/features_<model>/<slide>.h5``, yielding progress.

    ``<tiling>`` is :func:`~napari_gpfm.embeddings.store.tiling_dir_name` of the spec (e.g.
    ``0.5mpp_224px_0px_overlap``), so other tilings get their own store; ``<slide>`` is
    ``slide.name``. The store records the slide's fingerprint: a finished store or a partial one
    computed from another file of the same name is refused (:class:`SlideMismatchError`), never
    reused or resumed.

    Args:
        slide_or_path: a :class:`~napari_gpfm.slide.Slide` or a path to open.
        encoder: from :func:`napari_gpfm.encoders.load_encoder`.
        spec: tiling (a GridSpec, or a :class:`~napari_gpfm.embeddings.tiling.Level0Tiling`
            resolved against the slide); ``None`` uses :func:`default_spec`.
        out_dir: output root.
        tissue_params: tissue detection parameters (defaults: :class:`TissueParams`).
        batch_size: patches per forward pass and per store chunk, or ``"auto"``
            (:func:`resolve_batch_size`: from free GPU memory on CUDA).
        num_workers: patch-reading processes (``None``: :func:`default_num_workers` for the
            device; 0: main process).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precision: ``"auto"`` (fp16 on CUDA, fp32 elsewhere), ``"fp32"``, ``"fp16"`` or
            ``"bf16"``; the resolved value is part of the recipe. A finished or partial store
            of another precision is refused (:class:`PrecisionMismatchError`, naming the file
            and both precisions) unless ``overwrite``.
        compile: run the network through ``torch.compile`` (off, with a
            :class:`~napari_gpfm.embeddings.pipeline.CompileUnavailableWarning`, where Triton
            is missing on CUDA).
        pipeline_depth: batches in flight on the device (``None``: 1 on CUDA, 0 elsewhere).
        overwrite: re-embed even if a finished store exists (a different recipe or another
            slide file of the same name too); the old file is replaced only when the new one is
            complete. A partial file of another slide file is then started afresh.
        mpp: level-0 µm/px override for slides that lack (or misreport) it.
        opener: ``opener(path, mpp) -> Slide`` used for paths and by workers (picklable).
        torch_threads: CPU intra-op threads during the run (``None``: :func:`cpu_threads_for`).

    Yields:
        :class:`EmbedProgress` records; the generator's return value is the store path.

    Raises:
        MissingMppError: the slide has no mpp and none was given.
        NoTissueError: no tissue, or no patch reaches ``spec.min_tissue`` (no store written).
        RecipeMismatchError: a finished store with another recipe exists (use ``overwrite``);
            :class:`PrecisionMismatchError` when only its precision differs (or a partial
            store's: resuming it in another precision is refused too).
        SlideMismatchError: the finished (or partial) store at the path was computed from
            another slide file with the same name, or from this path before the file was
            replaced (use another ``out_dir``, or ``overwrite``).
        DamagedStoreError: the finished store at the path is damaged (``overwrite`` replaces
            it).
        NonFiniteFeaturesError: the model gave NaN or inf for some patches: the store is not
            marked complete and its ``.partial`` file stays for inspection (``overwrite``
            starts afresh).
        OutputWriteError: the disk is full or failed; the ``.partial`` file keeps the chunks
            written before (the next run resumes them) and a previous store is untouched.
    """
    t_start = time.perf_counter()
    slide = _open(slide_or_path, mpp, opener)
    owns_slide = isinstance(slide_or_path, (str, Path))
    opts = EmbedOptions(
        tissue_params=tissue_params or TissueParams(), batch_size=batch_size,
        num_workers=num_workers, device=device, overwrite=overwrite, opener=opener,
        torch_threads=torch_threads, max_patches=max_patches, precision=precision,
        compile=compile, pipeline_depth=pipeline_depth,
    )  # fmt: skip
    try:
        return (yield from _embed_open_slide(slide, encoder, spec, Path(out_dir), t_start, opts))
    finally:
        if owns_slide and hasattr(slide, "close"):
            slide.close()


@dataclass(frozen=True)
class EmbedOptions:
    """How :func:`embed_slide` runs, apart from the slide, the model, the tiling and the output
    folder (the keyword arguments of :func:`embed_slide`, documented there)."""

    tissue_params: TissueParams = field(default_factory=TissueParams)
    batch_size: int | str = DEFAULT_BATCH_SIZE
    num_workers: int | None = None
    device: str | torch.device = "auto"
    overwrite: bool = False
    opener: Callable[..., Any] | None = None
    torch_threads: int | None = None
    max_patches: int | None = DEFAULT_MAX_PATCHES
    precision: str | None = "auto"
    compile: bool = False
    pipeline_depth: int | None = None


def _embed_open_slide(slide: Any, encoder: Any, spec: GridSpec | None, out_dir: Path,
                      t_start: float, opts: EmbedOptions) -> Generator[EmbedProgress, None, Path]:
    """Body of :func:`embed_slide` once the slide is open: the recipe and its store path, a
    finished store skipped, else tissue and grid, the store resumed or created, and the run."""
    spec = spec_for_slide(spec or default_spec(encoder), slide)
    dev = resolve_device(opts.device)
    recipe = make_recipe(encoder, slide, spec, opts.tissue_params, precision=opts.precision,
                         device=dev)  # fmt: skip
    final = recipe_store_path(out_dir, recipe, slide.name)

    if final.exists() and not opts.overwrite:
        existing = find_store(out_dir, slide, recipe)
        assert existing is not None
        n = existing.n_patches
        yield EmbedProgress(slide.name, n, n, 0.0, 0.0, 0.0, "skipped", final)
        return final

    grid = _tissue_grid(slide, spec, encoder, opts)
    model = getattr(encoder, "model", None)
    if isinstance(model, torch.nn.Module):
        if _model_device(encoder) not in (None, dev):
            model.to(dev)
        model.eval()
    writer = _open_writer(final, recipe, grid, int(encoder.embed_dim), slide, opts.overwrite)
    return (yield from _run(slide, encoder, grid, writer, recipe, dev, t_start, opts))


def _tissue_grid(slide: Any, spec: GridSpec, encoder: Any, opts: EmbedOptions) -> Any:
    """The patch grid over the slide's tissue; :class:`NoTissueError` when there is none."""
    tissue = detect_tissue(slide, opts.tissue_params)
    if tissue.is_empty:
        raise NoTissueError(no_tissue_message(slide.path, opts.tissue_params))
    grid = make_grid(slide, spec, tissue, encoder_input=_encoder_input_size(encoder),
                     max_patches=opts.max_patches)  # fmt: skip
    if len(grid) == 0:
        raise NoTissueError(
            no_tissue_message(
                slide.path,
                opts.tissue_params,
                f"tissue covers {tissue.tissue_fraction:.1%} of the thumbnail but no "
                f"{grid.patch_size_level0} px patch reaches min_tissue={spec.min_tissue}",
            )
        )
    return grid


def _open_writer(final: Path, recipe: Any, grid: Any, embed_dim: int, slide: Any,
                 overwrite: bool) -> StoreWriter:  # fmt: skip
    """The store's writer: a partial file with the same recipe resumed, else a new one.

    A partial file with the same recipe holds exactly the features this run would compute, so
    it is resumed even under ``overwrite``; one of another recipe is started afresh. One of
    another slide file or precision is refused, or started afresh under ``overwrite``."""
    fingerprint = slide_fingerprint(slide)
    try:
        writer = StoreWriter.resume(final, recipe=recipe, coords=grid.coords,
                                    embed_dim=embed_dim, slide_fingerprint=fingerprint)
    except (SlideMismatchError, PrecisionMismatchError):
        if not overwrite:
            raise
        writer = None
    if writer is not None and overwrite and writer.n_nonfinite:
        # NaN/inf rows would only be refused again at the end: overwrite starts afresh (e.g. on
        # another device)
        writer.close()
        writer = None
    if writer is None:
        writer = StoreWriter.create(
            final,
            recipe=recipe,
            coords=grid.coords,
            embed_dim=embed_dim,
            slide_name=slide.name,
            level0_width=grid.level0_width,
            level0_height=grid.level0_height,
            tissue_fraction=grid.tissue_fraction,
            slide_fingerprint=fingerprint,
        )
    return writer


def _run(slide: Any, encoder: Any, grid: Any, writer: StoreWriter, recipe: Any,
         dev: torch.device, t_start: float,
         opts: EmbedOptions) -> Generator[EmbedProgress, None, Path]:  # fmt: skip
    """Read the patches not yet in the store (loader workers), embed them (the device pipeline)
    and write them; the store is finished, or closed with what it holds on any error."""
    final = writer.final_path
    total = len(grid)
    start = writer.n_done
    workers = default_num_workers(dev) if opts.num_workers is None else int(opts.num_workers)
    batch = resolve_batch_size(opts.batch_size, encoder, dev, recipe.precision or "fp32")
    user_mpp = slide.mpp if getattr(slide, "mpp_source", None) == "user" else None
    dataset = PatchDataset(
        slide.path,
        grid.coords[start:],
        grid.patch_size_level0,
        grid.out_size,
        mpp=user_mpp,
        opener=opts.opener,
        slide=slide if workers == 0 else None,
    )
    threads = opts.torch_threads
    if threads is None and dev.type == "cpu":
        threads = cpu_threads_for(workers)
    # Fork the loader workers while the store is closed, so that no worker inherits the HDF5
    # file (and its lock, which an orphaned worker would keep after the parent is killed).
    writer.close()
    batches = iter_batches(
        dataset, batch_size=batch, num_workers=workers, pin_memory=dev.type == "cuda"
    )
    try:
        writer.reopen()
    except BaseException:
        batches.close()
        raise

    t_run = time.perf_counter()
    done = start
    forward = None
    try:
        forward = BatchForward(encoder, dev, recipe.precision or "fp32",
                               depth=opts.pipeline_depth, compiled=opts.compile)  # fmt: skip
        yield EmbedProgress(slide.name, done, total, 0.0, None, t_run - t_start, "started", final)
        with _torch_threads(threads):
            for patches, _ in batches:
                feats = forward.submit(patches)
                if feats is None:  # the pipeline is filling: nothing to write yet
                    continue
                done = writer.write(feats)
                yield _running(slide.name, done, start, total, t_run, t_start, final)
            for feats in forward.drain():
                done = writer.write(feats)
                yield _running(slide.name, done, start, total, t_run, t_start, final)
            path = writer.finish()
    except BaseException:
        if forward is not None:
            forward.discard()
        batches.close()
        with contextlib.suppress(OutputWriteError):  # the first error is the one to report
            writer.close()
        raise
    batches.close()
    elapsed = time.perf_counter() - t_run
    rate = (total - start) / elapsed if elapsed > 0 else 0.0
    yield EmbedProgress(
        slide.name, total, total, rate, 0.0, time.perf_counter() - t_start, "done", path
    )
    return path


def _running(name: str, done: int, start: int, total: int, t_run: float, t_start: float,
             final: Path) -> EmbedProgress:  # fmt: skip
    now = time.perf_counter()
    elapsed = now - t_run
    rate = (done - start) / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    return EmbedProgress(name, done, total, rate, eta, now - t_start, "running", final)


def resolve_batch_size(batch_size: int | str | None, encoder: Any, device: torch.device,
                       precision: str) -> int:  # fmt: skip
    """An explicit batch size (≥ 1), or for ``"auto"``/``None``
    :func:`~napari_gpfm.embeddings.pipeline.auto_batch_size` (free GPU memory on CUDA; small
    batches on the CPU, for a prompt Cancel)."""
    if batch_size in (None, "auto"):
        return auto_batch_size(encoder, device, precision)
    try:
        n = int(batch_size)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise UsageError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
    return n


def embed(
    slide_or_path: Any,
    encoder: Any,
    spec: GridSpec | None = None,
    out_dir: str | Path = ".",
    **kwargs: Any,
) -> Path:
    """Blocking :func:`embed_slide`; returns the finished store path."""
    gen = embed_slide(slide_or_path, encoder, spec, out_dir, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
