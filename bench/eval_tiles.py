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
    python bench/eval_tiles.py --model NAME --random-init --stain-shift

``--stain-shift`` also embeds every tile after a HED stain jitter (colour deconvolution,
``napari_gpfm.distill.augment.random_hed_jitter``: each stain's density scaled by
U(0.7, 1.3) and shifted by U(-0.02, 0.02), tile ``i`` drawn from seed ``i``; the strength was
fixed before any model was measured) and prints, next to the numbers above:

- shifted-domain: the same probe CV and kNN computed on the shifted tiles alone;
- cross-stain: probes fitted on the original tiles of the training folds predict the shifted
  tiles of the held-out fold (same folds and seeds), and 1-NN matches each shifted tile against
  the other 31 original tiles; the drop in points is original minus cross-stain.

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
    return embed_with(enc, images, batch), enc


def embed_with(enc, images: np.ndarray, batch: int = 8) -> np.ndarray:
    """(N, D) float features of uint8 (N, H, W, 3) tiles."""
    import torch

    feats = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            feats.append(enc.embed(enc.preprocess(images[s : s + batch])).float().cpu().numpy())
    return np.concatenate(feats)


STAIN_SHIFT = {"alpha": 0.3, "beta": 0.02}


def stain_shift(images: np.ndarray, alpha: float = STAIN_SHIFT["alpha"],
                beta: float = STAIN_SHIFT["beta"]) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same tiles HED-jittered, tile ``i`` with seed ``i``."""
    import torch

    from napari_gpfm.distill.augment import random_hed_jitter

    out = []
    for i, image in enumerate(images):
        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
        shifted = random_hed_jitter(chw, torch.Generator().manual_seed(i), alpha, beta)
        out.append(shifted.permute(1, 2, 0).numpy())
    return np.stack(out)


def cross_probe(X: np.ndarray, X_query: np.ndarray, y: np.ndarray, folds: int, seed: int,
                names: list[str]) -> float:
    """Balanced accuracy of probes fitted on ``X`` of the training folds, predicting
    ``X_query`` of the held-out fold (the folds of ``cv_report`` with the same seed)."""
    from sklearn.model_selection import StratifiedKFold

    from napari_gpfm.analyses.probe import balanced_accuracy, fit_probe

    codes = np.array([names.index(v) for v in y])
    pred = np.empty_like(codes)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, codes):
        probe = fit_probe(X[train], codes[train], names)
        pred[test] = probe.predict(X_query[test])
    return balanced_accuracy(codes, pred, np.arange(len(names)))


def knn_loo(X: np.ndarray, y: np.ndarray, k: int, X_query: np.ndarray | None = None) -> float:
    """Leave-one-out kNN balanced accuracy, cosine on L2-normalised features; with
    ``X_query``, row ``i`` of ``X_query`` is matched against the rows of ``X`` other than ``i``."""
    Z = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    Q = Z if X_query is None else \
        X_query / np.maximum(np.linalg.norm(X_query, axis=1, keepdims=True), 1e-12)
    S = Q @ Z.T
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
    ap.add_argument("--stain-shift", action="store_true",
                    help="also evaluate HED-jittered tiles (see above)")
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
    if args.stain_shift:
        Xs = embed_with(enc, stain_shift(images))
        shifted = [cv_report(Xs, y, folds=args.folds, seed=s, class_names=names).balanced_accuracy
                   for s in range(args.repeats)]
        cross = [cross_probe(X, Xs, y, args.folds, s, names) for s in range(args.repeats)]
        c1 = knn_loo(X, y, 1, X_query=Xs)
        print(f"stain shift (HED alpha {STAIN_SHIFT['alpha']}, beta {STAIN_SHIFT['beta']}, "
              f"seed = tile index):")
        print(f"  shifted tiles alone: probe {np.mean(shifted):.3f} ± {np.std(shifted):.3f}, "
              f"kNN k=1 {knn_loo(Xs, y, 1):.3f}, k=5 {knn_loo(Xs, y, 5):.3f}")
        print(f"  cross-stain (fit on original, test on shifted): probe {np.mean(cross):.3f} "
              f"± {np.std(cross):.3f} (drop {100 * (np.mean(scores) - np.mean(cross)):.1f} "
              f"points), 1-NN {c1:.3f} (drop {100 * (k1 - c1):.1f} points)")
    print(f"chance: {1 / len(names):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
