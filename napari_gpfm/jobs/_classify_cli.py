"""``napari-gpfm train-classifier`` and ``napari-gpfm classify``: patch classifiers, headless.

train-classifier: QuPath GeoJSON annotations on one slide → a classifier file of either kind
(``--method linear``: a linear probe on the slide's embeddings, ``.npz``; ``--method pathotune``:
prompts tuned on the frozen backbone over the labelled patches' pixels, ``.safetensors``), bound
to the recipe it was trained on. classify: a classifier file of either kind (recognised by
:func:`napari_gpfm.jobs.classifiers.load_classifier` from its content) + slides → per-class
GeoJSON polygons (or per-patch detections), per-patch CSV and HDF5 (columns ``prob_<class>``,
see :mod:`napari_gpfm.analyses.classifier`). The feature store
``<store-dir>/<tiling>/features_<model>/<slide>.h5`` is used when it exists (and was computed
from this slide file); otherwise a linear probe embeds the slide first and PathoTune lays the
classifier's tiling over the slide's tissue (it reads pixels, not features).

These commands handle both classifier kinds, so they live in ``jobs`` (``analyses`` never
imports ``pathotune``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any

from napari_gpfm.errors import NapariGpfmError, UsageError, require_file

__all__ = ["register", "run_train", "run_classify"]

TRAIN_EPILOG = """\
The classifier file holds the classifier (a probe's weights, or PathoTune's prompts), class
names and colours, and the recipe it was trained on (model, weights sha256, target mpp, patch
size). `classify` refuses to apply it to patches of another recipe. Shapes of QuPath's Ignore*
classes are left out of training. --method linear writes OUT as given (.npz); --method
pathotune writes OUT.safetensors.
"""

CLASSIFY_EPILOG = """\
classifier files: a linear probe (.npz) or a PathoTune classifier (.safetensors), told apart by
their content.

outputs (per slide, in --out):
  <slide>.geojson        one QuPath annotation per class (patch squares merged, holes kept)
                         with Area, Num patches and Mean probability measurements; with
                         --per-patch one QuPath detection per patch with prob_<class>... and
                         uncertainty measurements
  <slide>_patches.csv    x, y (level-0 top-left), class, class_name, prob_<class>..., uncertainty
  <slide>_patches.h5     coords, probabilities, labels, uncertainty (+ class names, recipe)
"""

METHODS = ("linear", "pathotune")


def _add_model_options(p: argparse.ArgumentParser, weights_help: str) -> None:
    """The options both commands share: weights, mpp, device, workers, test weights, model."""
    p.add_argument("--weights", type=Path, default=None, help=weights_help)
    p.add_argument("--mpp", type=float, default=None, help="level-0 microns/pixel override")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=None, help="patch-reading processes")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="use a random network if no weights are found (tests, benchmarks)")
    p.add_argument("--assume-model", default=None, metavar="NAME",
                   help="the model that made feature files of another tool that record none "
                        "(no 'encoder' attribute); such files are refused without it")


def register(subparsers: Any) -> None:
    """Add ``train-classifier`` and ``classify`` to ``subparsers``."""
    from napari_gpfm.pathotune._cli import add_prompt_arguments

    t = subparsers.add_parser(
        "train-classifier",
        help="train a patch classifier from QuPath GeoJSON annotations on a slide",
        description=__doc__.split("\n\n")[0],
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--annotations", required=True, type=Path, help="QuPath GeoJSON file")
    t.add_argument("--method", choices=METHODS, default="linear",
                   help="linear probe on stored embeddings (seconds), or PathoTune prompt tuning "
                        "of the frozen backbone on the patches' pixels (writes .safetensors)")
    t.add_argument("--slide", required=True, help="the annotated slide")
    t.add_argument("--out", required=True, type=Path, help="classifier file to write")
    t.add_argument("--model", default=None, help="model card name (default: GPFM if available)")
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
    _add_model_options(t, "weights file for the model")
    add_prompt_arguments(t.add_argument_group("PathoTune (with --method pathotune)"))
    t.set_defaults(func=run_train)

    c = subparsers.add_parser(
        "classify",
        help="apply a classifier file (linear probe or PathoTune) to slides: class polygons, "
             "per-patch tables",
        description="Apply a classifier file to whole-slide images.",
        epilog=CLASSIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files")
    c.add_argument("--classifier", required=True, type=Path,
                   help="classifier file (.npz linear probe or .safetensors PathoTune)")
    c.add_argument("--out", required=True, type=Path, help="output folder")
    c.add_argument("--store-dir", type=Path, default=None,
                   help="feature stores folder (default: --out)")
    c.add_argument("--per-patch", action="store_true",
                   help="GeoJSON with one detection per patch instead of merged class polygons")
    _add_model_options(c, "weights file: of the model, when a slide must be embedded first; of "
                          "PathoTune's backbone")
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


def _existing_store(store_dir: Path, model: str, slide: Any, spec: Any) -> Any:
    """The slide's finished store for ``model`` at ``spec``'s tiling, or ``None``."""
    from napari_gpfm.embeddings import open_store, store_path, tiling_dir_name

    tiling = tiling_dir_name(spec.target_mpp, spec.patch_size, spec.overlap)
    path = store_path(store_dir, model, slide.name, tiling)
    return open_store(path, expected_slide=slide) if path.exists() else None


# --- train-classifier --------------------------------------------------------------------------


def train_store(args: argparse.Namespace) -> Any:
    """The slide's feature store for ``train-classifier`` (found, or made by embedding)."""
    from types import SimpleNamespace

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
    store = None if args.weights is not None else _existing_store(store_dir, name, slide, spec)
    if store is not None:
        return store
    encoder = load_encoder(name, weights=args.weights, device="cpu",
                           allow_random=args.allow_random_weights)
    return _embed_store(slide, encoder, spec, store_dir, args)


def run_train(args: argparse.Namespace) -> int:
    """``train-classifier``: 0 ok, 1 training impossible (labels); bad input or setup raises a
    :class:`~napari_gpfm.errors.NapariGpfmError` (the CLI's exit code 2)."""
    from napari_gpfm.annotations import read_geojson
    from napari_gpfm.annotations.classes import ClassPalette
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
    train = _train_pathotune if args.method == "pathotune" else _train_linear
    try:
        with _warning_lines():
            result = train(args, anns, store, names, palette.colours(names))
    except NapariGpfmError:  # the features (NaN, unknown model...): exit code 2, named
        raise
    except ValueError as exc:  # the labels: fewer than two classes...
        _err(f"{args.annotations}: {exc}")
        return 1
    out = result.classifier.save(args.out)
    _report(result, out, store)
    palette.save(out.with_name(out.name.split(".")[0] + ".classes.json"))
    return 0


def _train_linear(args: argparse.Namespace, anns: Any, store: Any, names: list[str],
                  colours: Any) -> Any:  # fmt: skip
    from napari_gpfm.analyses.classify import train_probe

    return train_probe(anns, store, names, colours, min_fraction=args.min_fraction,
                       cv_folds=args.folds, assume_model=args.assume_model)


def _train_pathotune(args: argparse.Namespace, anns: Any, store: Any, names: list[str],
                     colours: Any) -> Any:  # fmt: skip
    """Prompt-tune the store's backbone on the pixels of the annotated patches (labels from the
    same shapes → patch rule as the linear probe)."""
    from napari_gpfm.analyses.classifier import PatchSet
    from napari_gpfm.analyses.classify import feature_model, labels_for_store
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.pathotune._cli import device_option, print_progress, train_patch_labels
    from napari_gpfm.pathotune._cli import training_options

    labels = labels_for_store(anns, store, names, args.min_fraction)
    present = set(labels.labels[labels.labels >= 0].tolist())
    if len(present) < 2:
        raise ValueError("PathoTune needs labelled patches of at least two classes (labelled: "
                         + ", ".join(f"{k} {v}" for k, v in labels.counts.items()) + ")")
    model = feature_model(store, args.assume_model, what="a PathoTune backbone")
    encoder = load_encoder(model, weights=args.weights, device=device_option(args.device),
                           allow_random=args.allow_random_weights)
    options = dataclasses.replace(training_options(args), colours=colours)
    result = train_patch_labels(encoder, PatchSet.from_store(store, args.slide, args.mpp),
                                labels.labels, names, options, print_progress)
    result.labels = labels
    return result


def _report(result: Any, out: Path, store: Any) -> None:
    """What training found and wrote, on stdout."""
    labels = result.labels
    print("labelled patches: " + ", ".join(f"{k} {v}" for k, v in labels.counts.items()))
    if len(labels.conflicts):
        print(f"conflicts (left unlabelled): {len(labels.conflicts)} patches")
    for note in result.notes:
        print(f"note: {note}")
    if result.report is not None:
        r = result.report
        recall = ", ".join(f"{k} {v:.2f}" for k, v in r.per_class_recall.items())
        print(f"cross-validated balanced accuracy ({r.folds} folds): "
              f"{r.balanced_accuracy:.3f}; recall: {recall}")
    elif result.classifier.kind == "pathotune":
        val = "-" if result.val_bal_acc is None else f"{result.val_bal_acc:.3f}"
        print(f"validation balanced accuracy {val} (best epoch {result.best_epoch})")
    what = {"linear": "linear probe", "pathotune": "PathoTune classifier"}[result.classifier.kind]
    print(f"{what} written to {out} (model {store.model}, features {store.path})")


# --- classify ----------------------------------------------------------------------------------


def _tiling(classifier: Any, source: Path) -> tuple[Any, Any]:
    """(GridSpec, TissueParams or None) of the grid the classifier was trained on."""
    from napari_gpfm.tiles import GridSpec, TissueParams

    recipe = classifier.recipe or {}
    if not recipe.get("model"):
        raise UsageError(f"{source}: the classifier records no model")
    if recipe.get("target_mpp") is None or recipe.get("patch_size") is None:
        raise UsageError(f"{source}: the classifier records no tiling (target_mpp, patch_size) "
                         "to find or compute the slides' patches with")
    spec = GridSpec(target_mpp=float(recipe["target_mpp"]), patch_size=int(recipe["patch_size"]),
                    overlap=int(recipe.get("overlap", 0) or 0),
                    min_tissue=float(recipe.get("min_tissue", 0.5)))
    tp = recipe.get("tissue_params")
    return spec, TissueParams.from_dict(tp) if isinstance(tp, dict) else None


def _encoder_for(classifier: Any, args: argparse.Namespace, cache: dict) -> Any:
    """The probe's embedding model (loaded once), refused when its weights are not the ones
    the classifier was trained on."""
    from napari_gpfm.encoders import load_encoder

    if "encoder" not in cache:
        recipe = classifier.recipe
        enc = load_encoder(recipe["model"], weights=args.weights, device="cpu",
                           allow_random=args.allow_random_weights)
        want = recipe.get("weights_sha256")
        if want and enc.weights_sha256 != want:
            raise UsageError(
                f"{args.classifier} was trained on features of {recipe['model']} with weights "
                f"{want}, but the weights found are {enc.weights_sha256}; pass --weights"
            )
        cache["encoder"] = enc
    return cache["encoder"]


def classify_patches(slide_path: str, classifier: Any, args: argparse.Namespace,
                     cache: dict) -> Any:  # fmt: skip
    """What the classifier predicts on this slide, checked against its recipe: the feature
    store of its tiling (found; for a linear probe made by embedding when missing), else for
    PathoTune the tiling laid over the slide's tissue (a ``PatchSet``)."""
    from napari_gpfm.analyses.classifier import PatchSet
    from napari_gpfm.slide import open_slide
    from napari_gpfm.tiles import detect_tissue, make_grid

    spec, tissue = _tiling(classifier, args.classifier)
    store_dir = args.store_dir or args.out
    slide = open_slide(slide_path, mpp=args.mpp)
    store = _existing_store(store_dir, classifier.recipe["model"], slide, spec)
    if classifier.kind == "pathotune":
        if store is not None:
            patches = PatchSet.from_store(store, slide_path, args.mpp)
        else:
            grid = make_grid(slide, spec, detect_tissue(slide, tissue))
            patches = PatchSet(str(slide_path), grid.coords, grid.patch_size_level0, slide.mpp,
                               classifier.recipe)
    else:
        patches = store if store is not None else _embed_store(
            slide, _encoder_for(classifier, args, cache), spec, store_dir, args, tissue)
    classifier.check_store(patches, source=str(args.classifier), assume_model=args.assume_model)
    return patches


def run_classify(args: argparse.Namespace) -> int:
    """``classify``: 0 ok, 1 a slide failed (its problem named: NaN features, an unknown or
    other model, a full disk...; the next slide is still tried, and a slide's outputs are
    written all or nothing); a missing input file or an unreadable classifier raises a
    :class:`~napari_gpfm.errors.NapariGpfmError` (the CLI's exit code 2)."""
    from napari_gpfm.analyses.classify import write_outputs
    from napari_gpfm.pathotune._cli import device_option

    from .classifiers import load_classifier

    path = require_file(args.classifier, "classifier file")
    for slide_path in args.slides:  # before any slide is embedded
        require_file(slide_path, "slide")
    classifier = load_classifier(path, device=device_option(args.device), weights=args.weights)
    failed = []
    cache: dict = {}
    for slide_path in args.slides:
        try:
            with _warning_lines():
                patches = classify_patches(slide_path, classifier, args, cache)
                pred = classifier.predict_store(patches, assume_model=args.assume_model)
            paths = write_outputs(pred, args.out, per_patch=args.per_patch)
            counts = ", ".join(f"{n} {int((pred.labels == i).sum())}"
                               for i, n in enumerate(pred.class_names))
            print(f"{slide_path}: {len(pred.labels)} patches ({counts}) -> "
                  + ", ".join(str(p) for p in paths.values()))
        except (NapariGpfmError, ValueError, OSError) as exc:
            msg = str(exc) or type(exc).__name__
            if Path(slide_path).name not in msg:
                msg = f"{slide_path}: {msg}"
            failed.append(msg)
            _err(msg)
    if failed:
        print(f"{len(failed)} of {len(args.slides)} slides failed", file=sys.stderr)
        return 1
    return 0
