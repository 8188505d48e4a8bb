"""``napari-gpfm train-classifier`` and ``napari-gpfm classify``: patch classifiers, headless.

train-classifier: QuPath GeoJSON annotations on one slide → a classifier file (linear probe on
the slide's embeddings, bound to their recipe). classify: a classifier file + slides → per-class
GeoJSON polygons (or per-patch detections), per-patch CSV and HDF5. Both use the feature store
``<store-dir>/<tiling>/features_<model>/<slide>.h5`` when it exists (and was computed from this
slide file) and embed the slide otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

from napari_gpfm.errors import NapariGpfmError, UsageError, require_file

__all__ = ["register", "run_train", "run_classify"]

TRAIN_EPILOG = """\
The classifier file (.npz) holds the probe's weights, class names and colours, and the
embedding recipe (model, weights sha256, target mpp, patch size). `classify` refuses to apply it
to features of another recipe. Shapes of QuPath's Ignore* classes are left out of training.
"""

CLASSIFY_EPILOG = """\
outputs (per slide, in --out):
  <slide>.geojson        one QuPath annotation per class (patch squares merged, holes kept)
                         with Area, Num patches and Mean probability measurements; with
                         --per-patch one QuPath detection per patch with probabilities
  <slide>_patches.csv    x, y (level-0 top-left), class, class_name, prob_<class>..., uncertainty
  <slide>_patches.h5     coords, probabilities, labels, uncertainty (+ class names, recipe)
"""


def register(subparsers: Any) -> None:
    """Add ``train-classifier`` and ``classify`` to ``subparsers``."""
    t = subparsers.add_parser(
        "train-classifier",
        help="train a patch classifier from QuPath GeoJSON annotations on a slide",
        description=__doc__.split("\n\n")[0],
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--annotations", required=True, type=Path, help="QuPath GeoJSON file")
    t.add_argument("--method", choices=("linear", "pathotune"), default="linear",
                   help="linear probe on stored embeddings (seconds), or PathoTune prompt tuning "
                        "of the frozen backbone on the patches' pixels (writes .safetensors)")
    t.add_argument("--slide", required=True, help="the annotated slide")
    t.add_argument("--out", required=True, type=Path, help="classifier file to write (.npz)")
    t.add_argument("--model", default=None, help="model card name (default: GPFM if available)")
    t.add_argument("--weights", type=Path, default=None, help="weights file for the model")
    t.add_argument("--store-dir", type=Path, default=None,
                   help="feature stores folder (default: the folder of --out)")
    t.add_argument("--min-fraction", type=float, default=0.5,
                   help="a patch takes a class when that much of it lies inside its shapes")
    t.add_argument("--classes", default=None,
                   help="comma-separated class names and order (default: classes met)")
    t.add_argument("--folds", type=int, default=5, help="cross-validation folds (0: none)")
    t.add_argument("--target-mpp", type=float, default=None,
                   help="embed at this microns/pixel (default: the model card's)")
    t.add_argument("--patch-size", type=int, default=None, help="patch side in px at target mpp")
    t.add_argument("--mpp", type=float, default=None, help="level-0 microns/pixel override")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--num-workers", type=int, default=None, help="patch-reading processes")
    t.add_argument("--allow-random-weights", action="store_true",
                   help="use a random network if no weights are found (tests, benchmarks)")
    t.add_argument("--assume-model", default=None, metavar="NAME",
                   help="the model that made a feature file of another tool that records none "
                        "(no 'encoder' attribute); such files are refused without it")
    from napari_gpfm.pathotune._cli import add_prompt_arguments

    add_prompt_arguments(t.add_argument_group("PathoTune (with --method pathotune)"))
    t.set_defaults(func=run_train)

    c = subparsers.add_parser(
        "classify",
        help="apply a classifier file to slides: class polygons, per-patch tables",
        description="Apply a classifier file to whole-slide images.",
        epilog=CLASSIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files")
    c.add_argument("--classifier", required=True, type=Path, help="classifier file (.npz)")
    c.add_argument("--out", required=True, type=Path, help="output folder")
    c.add_argument("--store-dir", type=Path, default=None,
                   help="feature stores folder (default: --out)")
    c.add_argument("--per-patch", action="store_true",
                   help="GeoJSON with one detection per patch instead of merged class polygons")
    c.add_argument("--weights", type=Path, default=None,
                   help="weights file, when a slide must be embedded first")
    c.add_argument("--mpp", type=float, default=None, help="level-0 microns/pixel override")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    c.add_argument("--num-workers", type=int, default=None, help="patch-reading processes")
    c.add_argument("--allow-random-weights", action="store_true",
                   help="embed with a random network if no weights are found (tests)")
    c.add_argument("--assume-model", default=None, metavar="NAME",
                   help="the model that made feature files of another tool that record none "
                        "(no 'encoder' attribute); such files are refused without it")
    c.set_defaults(func=run_classify)


def _err(msg: str) -> None:
    """One ``error:`` line on stderr (the CLI's form; see :func:`napari_gpfm.errors.error_line`)."""
    print("error: " + " ".join(msg.split()), file=sys.stderr)


@contextlib.contextmanager
def _warning_lines() -> Any:
    """Warnings raised inside (external features, assumed models...) as one ``warning:`` line
    each on stderr, each message once."""
    seen: set[str] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                text = " ".join(str(w.message).split())
                if text not in seen:
                    seen.add(text)
                    print(f"warning: {text}", file=sys.stderr)


def _embed_store(slide: Any, encoder: Any, spec: Any, store_dir: Path, args: Any,
                 tissue_params: Any = None) -> Any:
    from napari_gpfm.embeddings import embed, open_store

    print(f"embedding {slide.path} with {encoder.card.name} ...", file=sys.stderr)
    path = embed(slide, encoder, spec, store_dir, tissue_params=tissue_params,
                 num_workers=args.num_workers, device=args.device)
    return open_store(path)


def train_store(args: argparse.Namespace) -> Any:
    """The slide's feature store for ``train-classifier`` (found, or made by embedding)."""
    from types import SimpleNamespace

    from napari_gpfm.embeddings import open_store, store_path, tiling_dir_name
    from napari_gpfm.embeddings.run import default_spec
    from napari_gpfm.encoders import default_model_name, get_card, load_encoder
    from napari_gpfm.slide import open_slide

    store_dir = args.store_dir or args.out.resolve().parent
    name = args.model or default_model_name()
    slide = open_slide(args.slide, mpp=args.mpp)
    try:
        spec = default_spec(SimpleNamespace(card=get_card(name))).replace(
            target_mpp=args.target_mpp, patch_size=args.patch_size)
    except ValueError as exc:  # GridSpec refuses a non-positive mpp or size
        raise UsageError(f"--target-mpp / --patch-size: {exc}") from exc
    tiling = tiling_dir_name(spec.target_mpp, spec.patch_size, spec.overlap)
    path = store_path(store_dir, name, slide.name, tiling)
    if path.exists() and args.weights is None:
        return open_store(path, expected_slide=slide)
    encoder = load_encoder(name, weights=args.weights, device="cpu",
                           allow_random=args.allow_random_weights)
    return _embed_store(slide, encoder, spec, store_dir, args)


def run_train(args: argparse.Namespace) -> int:
    """``train-classifier``: 0 ok, 1 training impossible (labels); bad input or setup raises a
    :class:`~napari_gpfm.errors.NapariGpfmError` (the CLI's exit code 2)."""
    from napari_gpfm.annotations import read_geojson
    from napari_gpfm.annotations.classes import ClassPalette

    from napari_gpfm.analyses.classify import train_classifier
    from napari_gpfm.pathotune._cli import device_option

    require_file(args.annotations, "annotations file")  # both inputs, before any work
    require_file(args.slide, "slide")
    device_option(args.device)  # a device this machine lacks: refused before any work
    anns = read_geojson(args.annotations)
    store = train_store(args)
    palette = ClassPalette.from_annotations(anns)
    names = [s.strip() for s in args.classes.split(",")] if args.classes else (
        palette.training_names)
    for n in names:
        palette.ensure(n)
    if args.method == "pathotune":
        return run_train_pathotune(args, anns, store, names, palette)
    try:
        with _warning_lines():
            result = train_classifier(anns, store, names, palette.colours(names),
                                      min_fraction=args.min_fraction, cv_folds=args.folds,
                                      assume_model=args.assume_model)  # fmt: skip
    except NapariGpfmError:  # the features (NaN, unknown model...): exit code 2, named
        raise
    except ValueError as exc:
        _err(f"{args.annotations}: {exc}")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.probe.save(args.out)
    counts = ", ".join(f"{k} {v}" for k, v in result.labels.counts.items())
    print(f"labelled patches: {counts}")
    if len(result.labels.conflicts):
        print(f"conflicts (left unlabelled): {len(result.labels.conflicts)} patches")
    for note in result.notes:
        print(f"note: {note}")
    if result.report is not None:
        r = result.report
        recall = ", ".join(f"{k} {v:.2f}" for k, v in r.per_class_recall.items())
        print(f"cross-validated balanced accuracy ({r.folds} folds): "
              f"{r.balanced_accuracy:.3f}; recall: {recall}")
    print(f"classifier written to {args.out} (model {store.model}, {store.path})")
    palette.save(args.out.with_name(args.out.name.split(".")[0] + ".classes.json"))
    return 0


def run_train_pathotune(args: argparse.Namespace, anns: Any, store: Any, names: list[str],
                        palette: Any) -> int:
    """``train-classifier --method pathotune``: prompt-tune the store's backbone on the pixels of
    the annotated patches (labels from the same shapes → patch rule as the linear probe)."""
    from napari_gpfm.annotations import labels_from_annotations
    from napari_gpfm.encoders import load_encoder

    from napari_gpfm.pathotune import save_classifier
    from napari_gpfm.pathotune._cli import device_option, print_progress, train_patch_labels
    from napari_gpfm.pathotune._cli import training_options

    device = device_option(args.device)  # "auto" → CUDA when available, else CPU
    patch_labels = labels_from_annotations(anns, store.coords, store.patch_size_level0, names,
                                           min_fraction=args.min_fraction)
    keep = patch_labels.labels >= 0
    if keep.sum() < 2 or len(set(patch_labels.labels[keep].tolist())) < 2:
        _err(f"{args.annotations}: PathoTune needs labelled patches of at least two classes")
        return 1
    from napari_gpfm.analyses.classify import feature_model

    with _warning_lines():
        model = feature_model(store, getattr(args, "assume_model", None),
                              what="a PathoTune backbone")  # fmt: skip
    encoder = load_encoder(model, weights=args.weights, device=device,
                           allow_random=args.allow_random_weights)
    result = train_patch_labels(
        encoder, args.slide, store.coords[keep], store.patch_size_level0,
        [names[i] for i in patch_labels.labels[keep]], names,
        **training_options(args), mpp=args.mpp, on_progress=print_progress,
    )
    out = save_classifier(result.classifier, args.out)
    val = "-" if result.val_bal_acc is None else f"{result.val_bal_acc:.3f}"
    print(f"labelled patches: {int(keep.sum())}; validation balanced accuracy {val}")
    print(f"PathoTune classifier written to {out} (backbone {store.model})")
    palette.save(out.with_name(out.name.split(".")[0] + ".classes.json"))
    return 0


def classify_store(slide_path: str, probe: Any, args: argparse.Namespace, cache: dict) -> Any:
    """The slide's store matching the classifier's recipe (found, or made by embedding)."""
    from napari_gpfm.embeddings import open_store, store_path, tiling_dir_name
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.slide import open_slide
    from napari_gpfm.tiles import GridSpec, TissueParams

    from napari_gpfm.analyses.classify import check_recipe

    recipe = probe.recipe or {}
    model = recipe.get("model")
    if not model:
        raise ValueError(f"{args.classifier}: the classifier records no embedding model")
    if recipe.get("target_mpp") is None or recipe.get("patch_size") is None:
        raise ValueError(f"{args.classifier}: the classifier records no tiling "
                         "(target_mpp, patch_size) to find or compute features with")
    store_dir = args.store_dir or args.out
    slide = open_slide(slide_path, mpp=args.mpp)
    tiling = tiling_dir_name(float(recipe["target_mpp"]), int(recipe["patch_size"]),
                             int(recipe.get("overlap", 0) or 0))
    path = store_path(store_dir, model, slide.name, tiling)
    if path.exists():
        store = open_store(path, expected_slide=slide)
    else:
        if "encoder" not in cache:
            enc = load_encoder(model, weights=args.weights, device="cpu",
                               allow_random=args.allow_random_weights)
            want = recipe.get("weights_sha256")
            if want and enc.weights_sha256 != want:
                raise ValueError(
                    f"{args.classifier} was trained on features of {model} with weights "
                    f"{want}, but the weights found are {enc.weights_sha256}; pass --weights"
                )
            cache["encoder"] = enc
        spec = GridSpec(target_mpp=float(recipe["target_mpp"]),
                        patch_size=int(recipe["patch_size"]),
                        overlap=int(recipe.get("overlap", 0) or 0),
                        min_tissue=float(recipe.get("min_tissue", 0.5)))
        tp = recipe.get("tissue_params")
        tissue = TissueParams.from_dict(tp) if isinstance(tp, dict) else None
        store = _embed_store(slide, cache["encoder"], spec, store_dir, args, tissue)
    check_recipe(probe, store, source=str(args.classifier),
                 assume_model=getattr(args, "assume_model", None))
    return store


def run_classify(args: argparse.Namespace) -> int:
    """``classify``: 0 ok, 1 a slide failed (its problem named: NaN features, an unknown or
    other model, a full disk...; the next slide is still tried, and a slide's outputs are
    written all or nothing); a missing input file or an unreadable classifier raises a
    :class:`~napari_gpfm.errors.NapariGpfmError` (the CLI's exit code 2)."""
    from napari_gpfm.analyses.classify import predict_store, write_outputs
    from napari_gpfm.analyses.probe import load_probe

    probe = load_probe(require_file(args.classifier, "classifier file"))
    for slide_path in args.slides:  # before any slide is embedded
        require_file(slide_path, "slide")
    failed = []
    cache: dict = {}
    for slide_path in args.slides:
        try:
            with _warning_lines():
                store = classify_store(slide_path, probe, args, cache)
                pred = predict_store(probe, store, assume_model=args.assume_model)
            paths = write_outputs(pred, args.out, per_patch=args.per_patch)
            counts = ", ".join(f"{n} {int((pred.labels == i).sum())}"
                               for i, n in enumerate(pred.class_names))
            print(f"{slide_path}: {len(pred.labels)} patches ({counts}) -> "
                  + ", ".join(str(p) for p in paths.values()))
        except Exception as exc:
            msg = str(exc) or type(exc).__name__
            if Path(slide_path).name not in msg:
                msg = f"{slide_path}: {msg}"
            failed.append(msg)
            _err(msg)
    if failed:
        print(f"{len(failed)} of {len(args.slides)} slides failed", file=sys.stderr)
        return 1
    return 0
