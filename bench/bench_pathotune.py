"""PathoTune ablation on the 32 labelled CRC-VAL-HE-7K tiles; prints a markdown table.

Rows: a linear probe on the frozen CLS embedding, then PathoTune with TVP only, TVP+TTP and
TVP+TTP+IVP. Every row uses the same stratified 4-fold split (seeded) and reports balanced
accuracy on the held-out fold (mean ± sd over folds), trainable parameters against the
backbone's, training patches/s and prediction patches/s (this machine, CPU unless CUDA).

Prompt rows train with fixed epochs and no inner validation split (``--val-fraction 0``, the
default here): with 3 tiles per class per training fold, an inner split would leave 2 per
class and early stopping would follow noise. The product's default (20 % validation, early
stopping) is available with ``--val-fraction 0.2``.

    python bench/bench_pathotune.py --backbone gpfm-demo-student-vit-ti14
    python bench/bench_pathotune.py --tiny-random        # random ViT-Ti/14 at 112 px, no weights

``--tiny-random`` registers a temporary card for a randomly initialised ViT-Ti/14 (width 192,
12 blocks, 112 px, LayerScale 1) — the bundled student's architecture without its training, so
it measures cost and plumbing, not what prompts can do on a real foundation model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TILES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiles" / "crc-he"
TINY_NAME = "bench-vit-ti14-random"
TINY_CARD = f"""\
name: {TINY_NAME}
display_name: random ViT-Ti/14 at 112 px (benchmark only)
is_gpfm: false
architecture:
  timm_name: vit_small_patch14_dinov2
  kwargs: {{img_size: 112, embed_dim: 192, depth: 12, num_heads: 3, init_values: 1.0,
           num_classes: 0}}
checkpoint_layout: timm
input: {{size: 112, interpolation: bicubic, mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225]}}
embed_dim: 192
weights: {{file: null, env: null, default_path: null, hf_hub: null, url: null, sha256: null}}
license: Apache-2.0
gated: false
recommended_tiles: {{target_mpp: 0.5, patch_size: 224}}
provenance: {{}}
"""


def load_tiles(size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    with open(TILES / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    imgs = np.stack([np.asarray(Image.open(TILES / r["file"]).convert("RGB")
                                .resize((size, size), Image.BICUBIC)) for r in rows])
    labels = np.array([r["label"] for r in rows])
    return imgs, labels, sorted(set(labels.tolist()))


def probe_row(encoder, imgs, y, classes, folds) -> dict:
    import torch

    from napari_gpfm.analyses.probe import balanced_accuracy
    from napari_gpfm.analyses.probe import fit_probe

    t = time.perf_counter()
    with torch.inference_mode():
        feats = np.concatenate([encoder.embed(imgs[s : s + 32]).cpu().numpy()
                                for s in range(0, len(imgs), 32)])
    embed_rate = len(imgs) / (time.perf_counter() - t)
    scores, fit_s = [], 0.0
    for tr, te in folds:
        t = time.perf_counter()
        probe = fit_probe(feats[tr], y[tr], classes)
        fit_s += time.perf_counter() - t
        scores.append(balanced_accuracy(y[te], probe.predict(feats[te])))
    d = feats.shape[1]
    return {"row": "linear probe (frozen CLS)", "scores": scores,
            "trainable": d * len(classes) + len(classes),
            "train_rate": sum(len(tr) for tr, _ in folds) / max(fit_s, 1e-9),
            "train_note": "lbfgs on cached CLS", "predict_rate": embed_rate}


def prompt_row(encoder, imgs, y, classes, folds, config, args) -> dict:
    from napari_gpfm import pathotune as pt
    from napari_gpfm.analyses.probe import balanced_accuracy

    cfg = pt.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         val_fraction=args.val_fraction, patience=args.patience,
                         seed=args.seed, device=args.device)
    scores, rates, pred_rates, trainable = [], [], [], 0
    for k, (tr, te) in enumerate(folds):
        res = pt.run(pt.train_from_arrays(encoder, imgs[tr], y[tr], classes,
                                          pt.TuneOptions(config, train_config=cfg)))
        clf = res.classifier
        t = time.perf_counter()
        proba = pt.predict_arrays(clf, imgs[te], batch_size=32)
        pred_rates.append(len(te) / (time.perf_counter() - t))
        scores.append(balanced_accuracy(y[te], proba.argmax(1)))
        rates.append(res.train_patches_per_s)
        trainable = clf.model.n_trainable()
        print(f"  {config.label} fold {k + 1}: bal acc {scores[-1]:.3f}, "
              f"{res.train_patches_per_s:.1f} train patches/s", file=sys.stderr, flush=True)
    # prediction throughput on all 32 tiles (one more timed pass, steadier than per-fold)
    t = time.perf_counter()
    pt.predict_arrays(clf, imgs, batch_size=32)
    pred_rates.append(len(imgs) / (time.perf_counter() - t))
    return {"row": f"PathoTune {config.label}", "scores": scores, "trainable": trainable,
            "train_rate": statistics.median(rates), "train_note": f"{args.epochs} epochs",
            "predict_rate": max(pred_rates)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default=None, help="model card name")
    ap.add_argument("--weights", default=None, help="backbone weights file")
    ap.add_argument("--allow-random-weights", action="store_true")
    ap.add_argument("--tiny-random", action="store_true",
                    help=f"benchmark a random ViT-Ti/14 ({TINY_NAME}) instead")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--val-fraction", type=float, default=0.0)
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--n-tvp", type=int, default=8)
    ap.add_argument("--n-ivp", type=int, default=4)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch
    from sklearn.model_selection import StratifiedKFold

    from napari_gpfm import pathotune as pt
    from napari_gpfm.encoders import load_encoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny_random:
        d = Path(tempfile.mkdtemp(prefix="bench-pathotune-"))
        (d / f"{TINY_NAME}.yaml").write_text(TINY_CARD)
        os.environ["NAPARI_GPFM_MODELS_DIR"] = str(d)
        args.backbone, args.allow_random_weights = TINY_NAME, True
    if not args.backbone:
        ap.error("give --backbone NAME or --tiny-random")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    encoder = load_encoder(args.backbone, weights=args.weights, device=device,
                           allow_random=args.allow_random_weights, seed=args.seed)
    imgs, labels, classes = load_tiles(encoder.input_size)
    y = np.array([classes.index(v) for v in labels])
    skf = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
    folds = list(skf.split(np.zeros(len(y)), y))
    n_backbone = sum(p.numel() for p in encoder.model.parameters())

    configs = [
        pt.PromptConfig(tvp=True, n_tvp=args.n_tvp, ttp=False, ivp=False),
        pt.PromptConfig(tvp=True, n_tvp=args.n_tvp, ttp=True, ivp=False),
        pt.PromptConfig(tvp=True, n_tvp=args.n_tvp, ttp=True, ivp=True, n_ivp=args.n_ivp),
    ]
    t0 = time.perf_counter()
    rows = [probe_row(encoder, imgs, y, classes, folds)]
    for config in configs:
        rows.append(prompt_row(encoder, imgs, y, classes, folds, config, args))

    print(f"\nPathoTune ablation: {args.backbone} (weights {encoder.weights_sha256[:24]}), "
          f"{len(y)} tiles, {len(classes)} classes, {args.folds}-fold stratified CV "
          f"(seed {args.seed}), {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}\n")
    print("| method | balanced acc (mean ± sd) | per fold | trainable params | "
          "% of backbone | train patches/s | predict patches/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["scores"]
        print(f"| {r['row']} | {statistics.mean(s):.3f} ± {statistics.stdev(s):.3f} | "
              f"{', '.join(f'{v:.2f}' for v in s)} | {r['trainable']:,} | "
              f"{100 * r['trainable'] / n_backbone:.2f} % | {r['train_rate']:.1f} "
              f"({r['train_note']}) | {r['predict_rate']:.1f} |")
    print(f"\nbackbone parameters: {n_backbone:,} (frozen); chance = {1 / len(classes):.3f}; "
          f"total wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"backbone": args.backbone, "rows": rows,
                                         "n_backbone": n_backbone, "args": vars(args)},
                                        default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
