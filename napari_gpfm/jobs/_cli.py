"""``napari-gpfm embed``: slides → TRIDENT-compatible feature files, from the command line.

Many slides per call; a slide that fails is reported (file and problem) and the others go on;
the exit code is non-zero at the end if any failed. Under ``torchrun`` (environment ``RANK`` and
``WORLD_SIZE``) each rank embeds its share ``slides[rank::world_size]`` on ``cuda:LOCAL_RANK``.

Each slide runs through :func:`napari_gpfm.jobs.embed.embed_or_load`, the job behind the GPFM
dock: a slide whose finished store (same file, same recipe) exists is skipped before the model
is built, so re-running over an embedded cohort never loads the model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from napari_gpfm.errors import error_line, require_file

__all__ = ["build_spec", "main", "rank_and_world", "register", "run_embed", "shard"]

EPILOG = """\
tiling:
  The patch field is PATCH_SIZE pixels at TARGET_MPP microns/pixel, computed from the slide's
  exact mpp (no 20x/40x bucketing). --magnification M is shorthand for --target-mpp 10/M
  (20 -> 0.5 um/px, 40 -> 0.25 um/px). Presets: gpfm-20x-224 (224 px at 0.5 um/px = 112 um:
  TRIDENT's GPFM setting), gpfm-40x-512to224 (512 px at 0.25 um/px = 128 um, resized to 224:
  GPFM's authors' field of view, by exact mpp; the GPFM card's default). --level0-px 512 cuts
  512 level-0 px whatever the mpp, as the authors' scripts do (129.4 um on a 0.2527 um/px
  scan). Default: the model card's recommended tiling, else gpfm-20x-224.

output:
  OUT/<tiling>/features_<model>/<slide>.h5, with <tiling> like 0.5mpp_224px_0px_overlap and
  <slide> the file name without its last extension (case1.HE.svs -> case1.HE). Resumable:
  rerunning continues an interrupted slide and skips finished ones (unless --overwrite),
  without loading the model when every slide is finished. A store made from another file with
  the same name is refused: use another --out.

failures (the slide is reported, the others go on, exit code 1):
  A full disk or an I/O error names the file and the errno (ENOSPC, EIO...); the .partial file
  keeps what was written (rerun to resume) and a finished store is untouched. Features with NaN
  or inf are never marked complete (the .partial stays for inspection; --overwrite starts
  afresh). A damaged store (checksums, metadata) is named with what is damaged: --overwrite
  replaces it. A slide file replaced since its store was started or finished is refused,
  naming both.

precision:
  --precision auto (default) computes in fp16 on CUDA and fp32 on a CPU; the resolved value is
  recorded in the store and its recipe key. A finished or unfinished store of another precision
  is refused, naming the file and both precisions (--overwrite re-embeds). Stores made before
  precision was recorded are refused for resuming and reuse (their precision is unknown) but
  open for viewing.

multi-GPU:
  torchrun --nproc_per_node=4 -m napari_gpfm.jobs._cli SLIDES... --out DIR
  (or `napari-gpfm embed` under torchrun): rank r embeds slides[r::world_size].
"""

#: The job's stage while it builds the model: a failure there concerns every slide.
_LOADING_MODEL = "loading model"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``embed`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    from napari_gpfm.tiles.grid import PRESETS
    from napari_gpfm.tiles.tissue import METHODS as TISSUE_METHODS

    p = subparsers.add_parser(
        "embed",
        help="embed whole-slide images into TRIDENT-compatible feature files",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (or DICOM folders)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--model", default=None, help="model card name (default: GPFM if available)")
    p.add_argument("--weights", type=Path, default=None, help="weights file for the model")
    p.add_argument("--mpp", type=float, default=None,
                   help="level-0 microns/pixel, for slides that lack (or misreport) it")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--target-mpp", type=float, default=None,
                     help="microns/pixel at which patches are cut (0.5 = 20x)")
    tgt.add_argument("--magnification", type=float, default=None,
                     help="target magnification M, converted to target mpp 10/M")
    tgt.add_argument("--level0-px", type=int, default=None, metavar="N",
                     help="patches of N level-0 pixels whatever the slide's mpp, as GPFM's "
                          "authors' scripts cut (512 on 40x scans), resized to the model input; "
                          "--overlap is then in level-0 pixels too")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="tile preset")
    p.add_argument("--patch-size", type=int, default=None, help="patch side in px at target mpp")
    p.add_argument("--overlap", type=int, default=None, help="overlap in px at target mpp")
    p.add_argument("--min-tissue", type=float, default=None,
                   help="minimum tissue fraction of a patch (default 0.5; 0 keeps all)")
    p.add_argument("--tissue-method", choices=TISSUE_METHODS, default="auto",
                   help="auto: Otsu on bimodal histograms, else saturation >= 0.07 (slides, "
                        "crops, TMAs); otsu: the earlier detector (reuse older stores); fixed: "
                        "saturation > min_saturation; none: the whole image is tissue")
    p.add_argument("--max-patches", type=int, default=2_000_000,
                   help="refuse a slide whose grid exceeds N patches, e.g. from an absurd pixel "
                        "size (default 2,000,000; 0: no limit)")
    p.add_argument("--no-tissue-mask", action="store_const", dest="tissue_method", const="none",
                   help="same as --tissue-method none: embed every patch (crops, ROIs)")
    p.add_argument("--batch-size", type=_batch_size, default=64, metavar="N|auto",
                   help="patches per forward pass (default 64); auto: from the free GPU memory "
                        "(a stated per-patch estimate, at most 512), small batches on a CPU")
    p.add_argument("--num-workers", type=int, default=None,
                   help="patch-reading processes (default min(2, CPUs); 0 = main process)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="what the model computes in; part of the recipe, so stores of another "
                        "precision are not reused or resumed. auto: fp16 on CUDA (closest to "
                        "fp32 at the speed of bf16), fp32 on a CPU; fp16/bf16 run as autocast "
                        "(on a CPU too)")
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (off by default; switched off "
                        "with a warning when Triton is unavailable on CUDA)")
    p.add_argument("--overwrite", action="store_true", help="re-embed finished slides")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="use a random network if no weights are found (tests, benchmarks)")
    p.set_defaults(func=run_embed)
    return p


#: The ``--precision`` choices (``napari_gpfm.encoders.device.PRECISION_CHOICES``, kept here so
#: that building the parser imports no torch; a test checks the two agree).
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")


def _batch_size(value: str) -> int | str:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return n


def rank_and_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun), else ``(0, 1)``."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    if world < 1 or not 0 <= rank < world:
        return 0, 1
    return rank, world


def shard(items: list[Any], rank: int, world: int) -> list[Any]:
    """This rank's share: ``items[rank::world]``."""
    return list(items[rank::world])


def build_spec(args: argparse.Namespace, card: Any) -> Any:
    """GridSpec from ``--preset`` (else the model card's tiling) with the explicit options
    applied; ``card`` is a :class:`~napari_gpfm.encoders.ModelCard` (no model is built)."""
    from napari_gpfm.embeddings.run import default_spec
    from napari_gpfm.embeddings.tiling import Level0Tiling
    from napari_gpfm.errors import UsageError
    from napari_gpfm.tiles.grid import get_preset, magnification_to_mpp

    if getattr(args, "level0_px", None) is not None:
        if args.preset or args.patch_size is not None:
            raise UsageError("--level0-px sets the whole patch (N level-0 pixels): give it "
                             "without --preset and --patch-size")  # fmt: skip
        min_tissue = 0.5 if args.min_tissue is None else args.min_tissue
        return Level0Tiling(size0=args.level0_px, overlap0=args.overlap or 0,
                            min_tissue=min_tissue)  # fmt: skip

    base = get_preset(args.preset) if args.preset else default_spec(SimpleNamespace(card=card))
    target = args.target_mpp
    if args.magnification is not None:
        target = magnification_to_mpp(args.magnification)
    return base.replace(
        target_mpp=target,
        patch_size=args.patch_size,
        overlap=args.overlap,
        min_tissue=args.min_tissue,
    )


def _device_for_rank(device: str) -> str:
    local = os.environ.get("LOCAL_RANK")
    if local is not None and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local) % max(1, torch.cuda.device_count())}"
    return device


def _describe_failure(path: str, exc: BaseException) -> str:
    """``<file>: <problem> (<error type>)``, without naming the file twice."""
    msg = str(exc) or type(exc).__name__
    if Path(path).name not in msg:
        msg = f"{path}: {msg}"
    return f"{msg} [{type(exc).__name__}]"


def run_embed(args: argparse.Namespace) -> int:
    """Run ``embed`` for parsed ``args``; returns the exit code (0 ok, 1 a slide failed,
    2 bad setup such as missing weights or a slide path that does not exist, 130 interrupted).
    """
    from tqdm import tqdm

    from napari_gpfm.encoders import (
        default_model_name,
        get_card,
        resolve_device,
        resolve_precision,
    )
    from napari_gpfm.jobs.embed import require_weights
    from napari_gpfm.tiles import TissueParams

    rank, world = rank_and_world()
    slides = shard(list(args.slides), rank, world)
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    if world > 1:
        print(f"{tag}{len(slides)} of {len(args.slides)} slides", file=sys.stderr)

    try:
        for path in args.slides:  # every rank checks every path: all stop alike, before the model
            require_file(path, "slide")
        device = str(resolve_device(_device_for_rank(args.device)))
        precision = resolve_precision(args.precision, device)
        card = get_card(args.model or default_model_name())
        weights = str(args.weights) if args.weights is not None else None
        require_weights(card, weights, args.allow_random_weights)  # the model is built on demand
        spec = build_spec(args, card)
    except Exception as exc:  # setup problems concern every slide: stop here
        print(f"{tag}{error_line(exc)}", file=sys.stderr)
        return 2
    if getattr(card, "is_gpfm", True) is False:
        print(f"{tag}note: model '{card.name}' is not GPFM", file=sys.stderr)

    settings = dict(model=card.name, spec=spec, out_dir=args.out,
                    tissue_params=TissueParams(method=args.tissue_method),
                    max_patches=args.max_patches or None,
                    device=device, allow_random=args.allow_random_weights,
                    batch_size=args.batch_size, num_workers=args.num_workers,
                    overwrite=args.overwrite, weights=weights, index=False,
                    precision=precision, compile=args.compile)  # fmt: skip
    failed: list[tuple[str, str]] = []
    for path in slides:
        bar = tqdm(desc=f"{tag}{Path(path).name}", unit="patch", file=sys.stderr, leave=True,
                   dynamic_ncols=True)
        state: dict[str, Any] = {}
        try:
            outcome = _embed_one(path, args.mpp, settings, bar, state)
            bar.close()
            verb = "skipped (already done)" if outcome.loaded else "done"
            print(f"{tag}{verb}: {path} -> {outcome.store.path} "
                  f"({outcome.store.n_patches} patches)")  # fmt: skip
        except KeyboardInterrupt:
            bar.close()
            print(f"{tag}interrupted: {path} (rerun to resume)", file=sys.stderr)
            return 130
        except Exception as exc:
            bar.close()
            if state.get("stage") == _LOADING_MODEL:  # e.g. a damaged weights file
                print(f"{tag}{error_line(exc)}", file=sys.stderr)
                return 2
            problem = _describe_failure(path, exc)
            failed.append((str(path), problem))
            tqdm.write(f"{tag}FAILED: {problem}", file=sys.stderr)

    done = len(slides) - len(failed)
    print(f"{tag}{done} of {len(slides)} slides embedded into {args.out}", file=sys.stderr)
    if failed:
        print(f"{tag}{len(failed)} failed:", file=sys.stderr)
        for _, problem in failed:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


def _embed_one(path: str, mpp: float | None, settings: dict[str, Any], bar: Any,
               state: dict[str, Any]) -> Any:  # fmt: skip
    """Open the slide, drive :func:`embed_or_load` on it (updating ``bar``; ``state["stage"]``
    is the job's last stage), close both; returns the job's
    :class:`~napari_gpfm.jobs.embed.EmbedOutcome`."""
    from napari_gpfm.jobs.embed import EmbedRequest, embed_or_load
    from napari_gpfm.slide import open_slide

    slide = open_slide(path, mpp=mpp)
    gen = None
    try:
        gen = embed_or_load(EmbedRequest(slide=slide, **settings))
        while True:
            try:
                progress = next(gen)
            except StopIteration as stop:
                return stop.value
            state["stage"] = progress.stage
            if progress.total:
                bar.total = progress.total
                bar.n = progress.done
            bar.set_postfix_str(progress.stage, refresh=True)
    finally:
        if gen is not None:
            gen.close()  # cancels a run stopped early (Ctrl+C): the partial store stays resumable
        slide.close()


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m napari_gpfm.jobs._cli``, e.g. under ``torchrun``)."""
    parser = argparse.ArgumentParser(prog="napari-gpfm")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["embed", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
