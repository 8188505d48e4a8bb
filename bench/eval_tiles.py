"""Honest numbers on the 32 labelled CRC H&E tiles: linear probe and kNN on a model's embeddings.

The tiles (``shared/data/tiles/crc-he``: 224 × 224 px at 0.5 µm/px, 8 classes × 4, Kather et
al. 2018, CC BY 4.0, doi:10.5281/zenodo.1214456) are fed straight to ``encoder.preprocess`` /
``encoder.embed`` (no tiling). Printed, with seeds fixed:

- linear probe (the product's ``fit_probe`` model: StandardScaler + balanced logistic
  regression), stratified 4-fold cross-validation: balanced accuracy on pooled out-of-fold
  predictions (``cv_report``), mean ± sd over ``--repeats`` shuffles (seeds 0..R-1);
- leave-one-out kNN, k = 1 and k = 5, cosine similarity on L2-normalised features (majority
  vote, ties to the nearest);
- chance level is 1/8 = 0.125. With 32 tiles a 95 % interval is about ±15 points: these numbers
  say "better than chance or not", not how good a model is.

    python bench/eval_tiles.py --model gpfm                       # needs GPFM weights
    python bench/eval_tiles.py --model vits14-random --allow-random-weights
    python bench/eval_tiles.py --model NAME --allow-random-weights --tiles DIR

``vits14-random`` is a ViT-S/14 (DINOv2 layout, 384-d, 12 blocks) card written to a temporary
models folder when no card of that name exists: a random-weight baseline of the student's size.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TILES = Path(os.environ.get("GPFM_SHARED", REPO.parent / "shared")) / "data/tiles/crc-he"

VITS14_CARD = """\
name: vits14-random
display_name: ViT-S/14 (random weights, baseline)
is_gpfm: false
architecture:
  timm_name: vit_small_patch14_dinov2
  kwargs: {img_size: 224, init_values: 1.0e-5, num_classes: 0}
checkpoint_layout: timm
input: {size: 224, interpolation: bicubic, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
embed_dim: 384
weights: {file: null, env: null, default_path: null, hf_hub: null, url: null, sha256: null}
license: Apache-2.0
gated: false
recommended_tiles: {target_mpp: 0.5, patch_size: 224}
provenance: {note: "random-init baseline for bench/eval_tiles.py"}
"""


def load_tiles(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 (N, 224, 224, 3), labels (N,), file names) from ``labels.csv``."""
    from PIL import Image

    rows = list(csv.DictReader(open(root / "labels.csv", encoding="utf-8")))
    images = np.stack([np.asarray(Image.open(root / r["file"]).convert("RGB")) for r in rows])
    return images, np.array([r["label"] for r in rows]), [r["file"] for r in rows]


def embed_tiles(model: str, images: np.ndarray, allow_random: bool, batch: int = 8) -> tuple:
    import torch

    from napari_gpfm.encoders import get_card, load_encoder
    from napari_gpfm.encoders.errors import UnknownModelError

    try:
        get_card(model)
    except UnknownModelError:
        if model != "vits14-random":
            raise
        tmp = Path(tempfile.mkdtemp(prefix="gpfm-eval-models-"))
        (tmp / "vits14-random.yaml").write_text(VITS14_CARD)
        os.environ["NAPARI_GPFM_MODELS_DIR"] = str(tmp)
    enc = load_encoder(model, allow_random=allow_random)
    feats = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            feats.append(enc.embed(enc.preprocess(images[s : s + batch])).float().cpu().numpy())
    return np.concatenate(feats), enc


def knn_loo(X: np.ndarray, y: np.ndarray, k: int) -> float:
    """Leave-one-out kNN balanced accuracy, cosine on L2-normalised features."""
    Z = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    S = Z @ Z.T
    np.fill_diagonal(S, -np.inf)
    classes = np.unique(y)
    pred = []
    for i in range(len(y)):
        nn = np.argsort(-S[i], kind="stable")[:k]
        votes = {c: 0 for c in classes}
        for j in nn:
            votes[y[j]] += 1
        best = max(votes.values())
        winners = [c for c in classes if votes[c] == best]
        pred.append(next(y[j] for j in nn if y[j] in winners))  # tie -> nearest
    pred = np.array(pred)
    from napari_gpfm.analyses.probe import balanced_accuracy

    return balanced_accuracy(y, pred, classes)


def random_init_card(name: str) -> str:
    """Register ``<name>-random-init``: the same card with no weights source, in a temporary
    user models folder, so that ``load_encoder`` builds the architecture with random weights."""
    from napari_gpfm.encoders import get_card

    data = get_card(name).to_dict()
    data["name"] = f"{name}-random-init"
    data["display_name"] = f"{data.get('display_name', name)} (random weights)"
    data["weights"] = {k: None for k in ("file", "env", "default_path", "hf_hub", "url", "sha256")}
    data.pop("bundled_default", None)
    folder = Path(tempfile.mkdtemp(prefix="eval-tiles-"))
    import yaml

    (folder / f"{data['name']}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["NAPARI_GPFM_MODELS_DIR"] = str(folder)
    return data["name"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model card (default: default_model_name())")
    ap.add_argument("--allow-random-weights", action="store_true")
    ap.add_argument("--random-init", action="store_true",
                    help="the model's architecture with seeded random weights (its baseline)")
    ap.add_argument("--tiles", type=Path, default=DEFAULT_TILES)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="CV shuffles (seeds 0..R-1)")
    args = ap.parse_args(argv)

    import torch

    from napari_gpfm.analyses.probe import cv_report

    torch.manual_seed(0)
    model = args.model
    if model is None:
        from napari_gpfm.encoders import default_model_name

        model = default_model_name()
    if args.random_init:
        model = random_init_card(model)
        args.allow_random_weights = True
    images, y, _ = load_tiles(args.tiles)
    t = time.perf_counter()
    X, enc = embed_tiles(model, images, args.allow_random_weights)
    t_embed = time.perf_counter() - t
    names = sorted(set(y.tolist()))
    scores = [cv_report(X, y, folds=args.folds, seed=s, class_names=names).balanced_accuracy
              for s in range(args.repeats)]
    k1, k5 = knn_loo(X, y, 1), knn_loo(X, y, 5)
    weights = enc.weights_sha256 or "?"
    print(f"model {model} ({enc.card.display_name}), weights {weights[:24]}, "
          f"{X.shape[1]}-d, {len(y)} tiles / {len(names)} classes, embedded in {t_embed:.1f} s")
    print(f"linear probe, stratified {args.folds}-fold CV balanced accuracy: "
          f"{np.mean(scores):.3f} ± {np.std(scores):.3f} over seeds 0..{args.repeats - 1} "
          f"(seed 0: {scores[0]:.3f})")
    print(f"kNN leave-one-out balanced accuracy (cosine): k=1 {k1:.3f}, k=5 {k5:.3f}")
    print(f"chance: {1 / len(names):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
