"""Benchmark the analyses on synthetic but structured embeddings; prints a markdown table.

Embeddings are a mixture of Gaussians (``--clusters`` tissue types around random directions in
``--dim`` dimensions, random per-patch norms) laid out on a square patch grid in contiguous
"regions", so clustering, rasters and probes see realistic structure. Each timed step is compared,
where it makes sense, with a naive baseline measured in the same run.

    python bench/bench_analyses.py               # 100,000 × 1024, the sizes of a large slide
    python bench/bench_analyses.py --n 20000 --dim 256 --no-full-kmeans   # quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_gpfm.analyses.clusters import cluster_table, kmeans  # noqa: E402
from napari_gpfm.analyses.heatmap import heatmap_raster, labels_raster, patch_grid  # noqa: E402
from napari_gpfm.analyses.probe import fit_probe  # noqa: E402
from napari_gpfm.analyses.similarity import SimilarityIndex  # noqa: E402


def synthetic(n: int, dim: int, k: int, seed: int = 0):
    """(features float32, coords int64, true cluster ids) with spatially coherent tissue types."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    yy, xx = np.divmod(np.arange(n), side)
    coords = np.stack([xx, yy], 1).astype(np.int64) * 224 + (4096, 2048)
    # tissue type by a coarse random map: blocks of 16 × 16 patches
    blocks = rng.integers(0, k, size=(side // 16 + 1, side // 16 + 1))
    truth = blocks[yy // 16, xx // 16]
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    feats = rng.standard_normal((n, dim), dtype=np.float32)
    feats *= np.float32(0.9 / np.sqrt(dim))
    feats += centres[truth]
    feats *= rng.uniform(0.5, 3.0, size=(n, 1)).astype(np.float32)
    return feats, coords, truth


def timed(fn, repeat: int = 1, warmup: int = 0):
    """(result of the last call, median seconds over ``repeat`` calls after ``warmup`` calls).

    Warm-up calls absorb one-off costs (imports, first touch of freshly mapped memory) that
    would otherwise dominate a single measurement on a virtual machine.
    """
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def purity(labels: np.ndarray, truth: np.ndarray) -> float:
    return sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(truth)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=100_000, help="patches (default 100,000)")
    ap.add_argument("--dim", type=int, default=1024, help="embedding dimension (default 1024)")
    ap.add_argument("--clusters", type=int, default=8, help="planted tissue types / k (default 8)")
    ap.add_argument("--labelled", type=int, default=10_000, help="labelled patches for the probe")
    ap.add_argument("--no-full-kmeans", action="store_true", help="skip the full KMeans baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cap BLAS/OpenMP threads (threadpoolctl); use 1 on a shared or busy machine",
    )
    args = ap.parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(args.threads)  # noqa: F841  (kept for the whole run)

    rows: list[tuple] = []

    def add(step, size, secs, baseline="", base_secs=None, note=""):
        ratio = f"{base_secs / secs:.1f}×" if base_secs else ""
        base = f"{base_secs * 1e3:,.1f}" if base_secs else ""
        rows.append((step, size, f"{secs * 1e3:,.1f}", baseline, base, ratio, note))
        print(f"  {step}: {secs * 1e3:,.1f} ms {note}", file=sys.stderr, flush=True)

    (feats, coords, truth), t_gen = timed(
        lambda: synthetic(args.n, args.dim, args.clusters, args.seed)
    )
    size = f"{args.n:,}×{args.dim}"
    print(f"  generated {size} in {t_gen:.1f} s", file=sys.stderr)

    # --- k-means ------------------------------------------------------------------------------
    km, t_mb = timed(lambda: kmeans(feats, args.clusters, seed=args.seed, method="minibatch"), 3, 1)
    note = f"purity {purity(km.labels, truth):.3f}"
    if args.no_full_kmeans:
        add("k-means (MiniBatch, auto above 20k)", size, t_mb, note=note)
    else:
        full, t_full = timed(lambda: kmeans(feats, args.clusters, seed=args.seed, method="full"))
        note += f"; full KMeans purity {purity(full.labels, truth):.3f}"
        add(
            "k-means (MiniBatch, auto above 20k)",
            size,
            t_mb,
            "full KMeans (n_init=1)",
            t_full,
            note,
        )

    # --- rasters ------------------------------------------------------------------------------
    grid, t_grid = timed(lambda: patch_grid(coords, 224, 0.5), repeat=3)
    add("grid geometry (stride inference)", f"{args.n:,}", t_grid, note=f"raster {grid.shape}")
    scores = feats[:, 0]
    _, t_heat = timed(lambda: heatmap_raster(scores, grid), 3, 1)

    def naive_heat():  # python loop over patches: the obvious first implementation
        out = np.full(grid.shape, np.nan, np.float32)
        for v, r, c in zip(scores.tolist(), grid.rows.tolist(), grid.cols.tolist()):
            out[r, c] = v
        return out

    _, t_naive = timed(naive_heat, 3, 1)
    add("heatmap raster", f"{args.n:,}", t_heat, "per-patch python loop", t_naive)
    half = coords // 2  # same layout with stride 112 < patch 224: 4 cells per patch, averaged
    _, t_ovl = timed(lambda: heatmap_raster(scores, half, 224, 0.5), repeat=3)
    add("heatmap raster, stride = P/2 (overlap averaged)", f"{args.n:,}", t_ovl)
    _, t_lab = timed(lambda: labels_raster(km.labels, grid), repeat=3)
    add("labels raster (cluster ids)", f"{args.n:,}", t_lab)
    ty, tx = grid.translate
    clicks = np.random.default_rng(1).uniform(
        (ty, tx), (ty + grid.shape[0] * 112, tx + grid.shape[1] * 112), (10_000, 2)
    )
    _, t_click = timed(lambda: grid.patch_index_at(clicks), repeat=3)
    add(
        "patch_index_at (click → patch)",
        "10,000 points",
        t_click,
        note=f"{t_click / 1e4 * 1e9:.0f} ns/point",
    )
    _, t_tab = timed(lambda: cluster_table(km.labels, 224, 0.5, grid))
    add("cluster_table (union areas, µm²)", f"{args.n:,}", t_tab)

    # --- similarity ---------------------------------------------------------------------------
    index, t_index = timed(lambda: SimilarityIndex(feats, "synthetic"), 3, 1)
    add("similarity index build (normalise once)", size, t_index)
    q = [11, 12, 13]
    _, t_q = timed(lambda: index.top_k(index.query(q), 100, exclude=q), repeat=20)

    def naive_query():  # normalise the whole matrix for every query
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        qv = unit[q].mean(0)
        return unit @ (qv / np.linalg.norm(qv))

    _, t_nq = timed(naive_query, repeat=5, warmup=1)
    add("similarity query + top-100", size, t_q, "re-normalise per query", t_nq)

    # --- probe --------------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    lab_idx = rng.choice(args.n, min(args.labelled, args.n), replace=False)
    names = [f"type{i}" for i in range(args.clusters)]
    Xl, yl = feats[lab_idx], truth[lab_idx]
    fit_probe(Xl[:200], yl[:200], names)  # import/warm-up outside the timing

    def retrain_predict(previous=None):
        p = fit_probe(Xl, yl, names, previous=previous)
        return p, p.predict_proba(feats)

    (probe, proba), t_probe = timed(retrain_predict, 3, 1)
    acc = float(np.mean(proba.argmax(1) == truth))

    def sklearn_default():
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        pipe = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000)
        )
        pipe.fit(Xl, yl)
        return pipe.predict_proba(feats)

    _, t_sk = timed(sklearn_default, 1, 1)
    add(
        "probe retrain + predict (cold)",
        f"{len(lab_idx):,} → {args.n:,}",
        t_probe,
        "sklearn defaults (tol 1e-4, max_iter 1000, pipeline predict)",
        t_sk,
        f"accuracy on all patches {acc:.3f}",
    )
    # noisy features: strong isotropic noise makes lbfgs iterate longer
    noise = rng.standard_normal(Xl.shape, dtype=np.float32) * np.float32(4.0 / np.sqrt(args.dim))
    Xh = Xl * np.linalg.norm(Xl, axis=1, keepdims=True) ** -1 + noise

    def hard_retrain_predict():
        p = fit_probe(Xh, yl, names)
        return p, p.predict_proba(feats)

    (hard, _), t_hard = timed(hard_retrain_predict, 3, 1)
    add(
        "probe retrain + predict (noisy features)",
        f"{len(lab_idx):,} → {args.n:,}",
        t_hard,
        note=f"training accuracy {np.mean(hard.predict(Xh) == yl):.3f}",
    )
    yl2 = yl.copy()
    yl2[:50] = rng.integers(0, args.clusters, 50)  # "a few new labels"
    _, t_warm = timed(lambda: fit_probe(Xl, yl2, names, previous=probe).predict_proba(feats), 3, 1)
    _, t_cold2 = timed(lambda: fit_probe(Xl, yl2, names).predict_proba(feats), 3, 1)
    add(
        "probe retrain + predict after 50 new labels (warm start)",
        f"{len(lab_idx):,} → {args.n:,}",
        t_warm,
        "cold retrain on the same labels",
        t_cold2,
    )

    threads = args.threads or "default"
    print(
        f"\n### napari-gpfm analyses benchmark ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"BLAS/OpenMP threads {threads}, load average {os.getloadavg()[0]:.1f}, "
        f"numpy {np.__version__}, seed {args.seed})\n"
    )
    print("| step | size | time (ms) | baseline | baseline (ms) | speed-up | notes |")
    print("|---|---|---:|---|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
