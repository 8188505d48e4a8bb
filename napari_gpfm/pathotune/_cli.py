"""``napari-gpfm pathotune train|predict``: PathoTune prompt tuning from the command line.

Training data, either
  * ``--tiles-csv labels.csv``: a folder of tiles, CSV columns ``file`` (relative to the CSV)
    and ``label``; or
  * ``--slide S --patch-labels P.csv``: per-patch labels on a slide grid, CSV columns ``x``,
    ``y`` (level-0 top-left) and ``label``, with the patch side from ``--store`` (a feature file
    of that slide) or ``--patch-size-level0``. (QuPath GeoJSON annotations: use
    ``napari-gpfm train-classifier --method pathotune``.)

Prediction: ``--slide S --store F.h5`` predicts every patch of the store's grid and writes a
per-patch table (``x, y, class, class_name, prob_<class>..., uncertainty``, the columns of every
classifier's outputs; ``.csv`` or ``.parquet``); ``--tiles-csv`` predicts tiles (their ``file``
column is kept, ``label`` is ignored). ``napari-gpfm classify`` applies the same file to whole
slides (QuPath GeoJSON, CSV, HDF5).

Shared with ``train-classifier --method pathotune`` (:mod:`napari_gpfm.jobs._classify_cli`):
:func:`add_prompt_arguments`, :func:`training_options`, :func:`print_progress` and
:func:`device_option`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm.errors import InputFileError, UsageError, require_file

__all__ = ["add_prompt_arguments", "device_option", "print_progress", "read_tiles_csv",
           "register", "train_patch_labels", "train_tiles_csv", "training_options"]


def device_option(value: str | None) -> str:
    """``--device`` resolved (``auto`` → CUDA when available, else CPU) by
    :func:`napari_gpfm.encoders.device.resolve_device`, the one resolver every job uses; a device
    this machine lacks or a malformed name is a :class:`~napari_gpfm.errors.UsageError`."""
    from napari_gpfm.encoders.device import resolve_device

    try:
        return str(resolve_device(value))
    except RuntimeError as exc:  # torch: malformed name; resolve_device: CUDA missing
        raise UsageError(f"--device {value}: {exc}") from exc


def print_progress(record: Any) -> None:
    """One stderr line per epoch (and per status change) of a training run."""
    if record.status == "epoch":
        val = "-" if record.val_bal_acc is None else f"{record.val_bal_acc:.3f}"
        print(f"epoch {record.epoch}/{record.epochs}  loss {record.loss:.4f}  "
              f"train acc {record.train_acc:.3f}  val bal acc {val}  "
              f"{record.rate or 0:.1f} patches/s", file=sys.stderr)
    elif record.status not in ("step", "reading", "running"):
        print(record.message or record.status, file=sys.stderr)


def read_tiles_csv(path: str | Path, size: int | None = None) -> tuple[np.ndarray, list[str],
                                                                       list[str]]:
    """(uint8 tiles (N, S, S, 3), labels, files) from a CSV with ``file`` and ``label``
    columns; tiles are resized to ``size`` when given (they must share a size otherwise).

    Raises :class:`~napari_gpfm.errors.InputFileNotFoundError` for a missing CSV and
    :class:`~napari_gpfm.errors.InputFileError` (naming the CSV) for an unreadable one, a missing
    ``file`` column or a tile that cannot be read.
    """
    from PIL import Image

    path = require_file(path, "tiles CSV")
    rows = _read_csv(path)
    if not rows or "file" not in rows[0]:
        raise InputFileError(path, "needs a 'file' column (and 'label')")
    images = []
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        try:
            img = Image.open(path.parent / r["file"]).convert("RGB")
        except OSError as exc:  # missing file, not an image
            raise InputFileError(path, f"line {i}: cannot read tile {r['file']!r} ({exc})") from exc
        if size:
            img = img.resize((size, size), Image.BILINEAR)
        images.append(np.asarray(img))
    if len({im.shape for im in images}) > 1:
        raise InputFileError(path, "the tiles differ in size; give the model's input size")
    return np.stack(images), [r.get("label", "") for r in rows], [r["file"] for r in rows]


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(path, f"cannot read it as a CSV table ({exc})") from exc


def _prompt_config(args: argparse.Namespace):
    from . import PromptConfig

    return PromptConfig(tvp=not args.no_tvp, n_tvp=args.n_tvp, ttp=not args.no_ttp,
                        ivp=not args.no_ivp, n_ivp=args.n_ivp, head=args.head)


def _template(args: argparse.Namespace):
    from . import TextTemplate

    kw = {k: getattr(args, k) for k in ("template", "stain", "tissue", "task")
          if getattr(args, k) is not None}
    return TextTemplate(**kw)


def _train_config(args: argparse.Namespace):
    from . import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       val_fraction=args.val_fraction, patience=args.patience, seed=args.seed,
                       device=args.device)


def training_options(args: argparse.Namespace) -> Any:
    """The :class:`~napari_gpfm.pathotune.train.TuneOptions` (prompts, template, training)
    from the options :func:`add_prompt_arguments` added."""
    from . import TuneOptions

    return TuneOptions(_prompt_config(args), _template(args), _train_config(args))


def _classes(labels: list[str], given: str | None) -> list[str]:
    if given:
        return [c.strip() for c in given.split(",") if c.strip()]
    return list(dict.fromkeys(lab for lab in labels if lab))


def _encoder(args: argparse.Namespace):
    from napari_gpfm.encoders import default_model_name, load_encoder

    return load_encoder(args.model or default_model_name(), weights=args.weights,
                        allow_random=args.allow_random_weights)


def train_tiles_csv(encoder: Any, csv_path: str | Path, class_names: list[str] | None = None,
                    options: Any = None, on_progress: Any = None) -> Any:
    """Train on a folder of labelled tiles (see module docstring); returns the TrainResult."""
    from . import run, train_from_arrays

    images, labels, _ = read_tiles_csv(csv_path, int(encoder.card.input.size))
    classes = class_names or _classes(labels, None)
    return run(train_from_arrays(encoder, images, labels, classes, options), on_progress)


def train_patch_labels(encoder: Any, patches: Any, labels: Any, class_names: list[str],
                       options: Any = None, on_progress: Any = None) -> Any:
    """Train on per-patch labels of a slide grid (a
    :class:`~napari_gpfm.analyses.classifier.PatchSet`); returns the TrainResult (None if
    cancelled)."""
    from . import run, train_from_slide

    return run(train_from_slide(encoder, patches, labels, class_names, options), on_progress)


def _read_patch_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    rows = _read_csv(require_file(path, "patch labels CSV"))
    if not rows or not {"x", "y", "label"} <= set(rows[0]):
        raise InputFileError(path, "needs columns x, y, label")
    try:
        coords = np.array([[int(float(r["x"])), int(float(r["y"]))] for r in rows],
                          dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise InputFileError(path, f"x and y must be numbers ({exc})") from exc
    return coords, [r["label"] for r in rows]


def _cmd_train(args: argparse.Namespace) -> int:
    from napari_gpfm.analyses.classifier import PatchSet

    # inputs first (named when missing or malformed), then the backbone (slow)
    device_option(args.device)
    if args.tiles_csv:
        require_file(args.tiles_csv, "tiles CSV")
    else:
        if not (args.slide and args.patch_labels):
            raise UsageError("pathotune train: give --tiles-csv, or --slide with --patch-labels")
        require_file(args.slide, "slide")
        coords, labels = _read_patch_labels(args.patch_labels)
        size0, recipe = args.patch_size_level0, {}
        if args.store:
            from napari_gpfm.analyses.classify import store_recipe
            from napari_gpfm.embeddings import open_store

            store = open_store(require_file(args.store, "feature file"))
            size0, recipe = store.patch_size_level0, store_recipe(store)
        if not size0:
            raise UsageError("pathotune train: the patch side is unknown; give --store or "
                             "--patch-size-level0")
        patches = PatchSet(str(args.slide), coords, size0, args.mpp, recipe)
    enc = _encoder(args)
    options = training_options(args)
    if args.tiles_csv:
        result = train_tiles_csv(enc, args.tiles_csv, _classes([], args.classes) or None,
                                 options, print_progress)
    else:
        result = train_patch_labels(enc, patches, labels, _classes(labels, args.classes),
                                    options, print_progress)
    if result is None or result.cancelled:
        print("napari-gpfm pathotune: training cancelled; nothing written", file=sys.stderr)
        return 1
    path = result.classifier.save(args.out)
    clf = result.classifier
    print(f"{path}: {clf.config.label} on {enc.card.name}, {clf.model.n_trainable():,} "
          f"trainable parameters; validation balanced accuracy "
          f"{'n/a' if result.val_bal_acc is None else f'{result.val_bal_acc:.3f}'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from napari_gpfm.analyses.classifier import PatchSet, Prediction
    from napari_gpfm.analyses.export import write_table

    from . import load_pathotune, predict_arrays

    # inputs first (named when missing), then the classifier and its backbone (slow)
    require_file(args.classifier, "classifier file")
    if args.tiles_csv:
        require_file(args.tiles_csv, "tiles CSV")
    elif not (args.slide and args.store):
        raise UsageError("pathotune predict: give --tiles-csv, or --slide with --store")
    else:
        require_file(args.slide, "slide")
        require_file(args.store, "feature file")
    device = device_option(args.device)
    clf = load_pathotune(args.classifier, weights=args.weights, device=device)
    if args.tiles_csv:
        images, _, files = read_tiles_csv(args.tiles_csv, int(clf.encoder.card.input.size))
        tiles = PatchSet(None, np.zeros((len(files), 2), np.int64), images.shape[1])
        pred = Prediction.from_proba(predict_arrays(clf, images, args.batch_size),
                                     clf.class_names, tiles)
        extra = {"file": np.asarray(files)}
    else:
        from napari_gpfm.embeddings import open_store

        patches = PatchSet.from_store(open_store(args.store), args.slide, args.mpp)
        pred = clf.predict_store(patches, batch_size=args.batch_size,
                                 num_workers=args.num_workers)
        extra = {}
    print(write_table(args.out, pred.coords, {**extra, **pred.columns()}))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, default=None, help="backbone weights file")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:N")
    p.add_argument("--tiles-csv", type=Path, default=None,
                   help="CSV with 'file' (relative to the CSV) and 'label' columns")
    p.add_argument("--slide", type=Path, default=None, help="whole-slide image")
    p.add_argument("--store", type=Path, default=None, help="feature file of the slide (grid)")
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px override")


def add_prompt_arguments(p: argparse.ArgumentParser | Any) -> None:
    """PathoTune's prompt, template and training options (shared with ``train-classifier``)."""
    for name in ("tvp", "ttp", "ivp"):
        p.add_argument(f"--no-{name}", action="store_true", help=f"switch {name.upper()} off")
    p.add_argument("--n-tvp", type=int, default=8, help="visual prompt tokens per block")
    p.add_argument("--n-ivp", type=int, default=4, help="instance prompt tokens")
    p.add_argument("--head", choices=("cls", "cls+prompts"), default="cls")
    p.add_argument("--template", default=None, help="text template ({stain} {tissue} {task} "
                                                     "{classes})")
    p.add_argument("--stain", default=None)
    p.add_argument("--tissue", default=None)
    p.add_argument("--task", default=None)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``pathotune`` with sub-commands ``train`` and ``predict`` to ``subparsers``."""
    p = subparsers.add_parser(
        "pathotune", help="PathoTune multi-modal prompt tuning (train / predict)",
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="pathotune_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train a PathoTune classifier on labelled patches")
    _add_common(t)
    t.add_argument("--out", required=True, type=Path, help="classifier file (.safetensors)")
    t.add_argument("--model", default=None, help="backbone model card (default: GPFM)")
    t.add_argument("--allow-random-weights", action="store_true",
                   help="use a seeded random backbone when weights are missing (tests only)")
    t.add_argument("--patch-labels", type=Path, default=None,
                   help="CSV with x, y (level-0 top-left) and label columns")
    t.add_argument("--patch-size-level0", type=int, default=None)
    t.add_argument("--classes", default=None, help="comma-separated class order")
    add_prompt_arguments(t)
    t.set_defaults(func=_cmd_train)

    q = sub.add_parser("predict", help="predict patches with a PathoTune classifier")
    _add_common(q)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--classifier", required=True, type=Path, help="classifier file")
    q.add_argument("--out", required=True, type=Path, help="table (.csv or .parquet)")
    q.add_argument("--num-workers", type=int, default=None, help="patch-decoding processes")
    q.set_defaults(func=_cmd_predict)
    return p
