"""Clustering and 2-D projections of patch embeddings (k-means, PCA, UMAP).

Features are **L2-normalised** before k-means and projections (``normalise="l2"``, the
default): foundation-model embeddings are compared by cosine similarity, and on unit vectors
Euclidean k-means ranks points exactly as cosine distance does, while a few large-norm patches
(folds, pen marks) no longer dominate the centres. ``normalise="standard"`` (z-score per
dimension) and ``None`` are available for other encoders.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .heatmap import PatchGrid, patch_grid

__all__ = [
    "MINIBATCH_THRESHOLD",
    "ClusterResult",
    "normalise_features",
    "kmeans",
    "cluster_table",
    "pca",
    "umap_available",
    "umap",
]

#: Above this many patches :func:`kmeans` switches to MiniBatchKMeans.
MINIBATCH_FIT_SIZE = 25_000  # rows the mini-batch fit sees; all rows are then assigned
MINIBATCH_THRESHOLD = 20_000

Normalise = Literal["l2", "standard"] | None


def normalise_features(features: np.ndarray, normalise: Normalise = "l2") -> np.ndarray:
    """Return float32 features, L2-normalised per row, z-scored per column, or unchanged."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if normalise == "l2":
        norm = np.sqrt(np.einsum("ij,ij->i", x, x))  # no (N, D) temporary
        return x / np.maximum(norm, 1e-12)[:, None]
    if normalise == "standard":
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        std = x.std(axis=0, dtype=np.float64).astype(np.float32)
        return (x - mean) / np.where(std > 0, std, 1.0)
    if normalise is None:
        return x
    raise ValueError(f"normalise must be 'l2', 'standard' or None, got {normalise!r}")


@dataclass(frozen=True, eq=False)
class ClusterResult:
    """k-means output: ``labels`` (N,) int32 in 0..k-1, ``centres`` (k, D) in the normalised
    feature space, ``distances`` (N,) float32 Euclidean distance of each patch to its centre
    (a per-patch "atypicality" score), and the ``method`` actually used."""

    labels: np.ndarray
    centres: np.ndarray
    distances: np.ndarray
    method: str
    normalise: str | None


def nearest_centre(x: np.ndarray, centres: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Index of the nearest centre (Euclidean) for every row, in chunks of ``chunk`` rows:
    argmin |x − c|² = argmax (x·c − |c|²/2)."""
    half_sq = 0.5 * np.einsum("ij,ij->i", centres, centres)
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = np.argmax(x[start : start + chunk] @ centres.T - half_sq, axis=1)
    return out


def kmeans(
    features: np.ndarray,
    n_clusters: int,
    seed: int = 0,
    normalise: Normalise = "l2",
    method: Literal["auto", "full", "minibatch"] = "auto",
    minibatch_threshold: int = MINIBATCH_THRESHOLD,
) -> ClusterResult:
    """Seeded k-means of patch embeddings.

    ``method="auto"`` uses sklearn ``KMeans`` up to ``minibatch_threshold`` patches and
    ``MiniBatchKMeans`` above it. The mini-batch fit sees a seeded random subsample of at most
    ``MINIBATCH_FIT_SIZE`` patches (plenty to place k centres), then every patch is assigned to
    its nearest centre in one matrix product: at 100,000 patches this is several times faster
    than iterating mini-batches over all of them, with the same partition on clustered data.
    Clusters are renumbered by decreasing size (0 = largest), so labels are stable across runs
    and methods.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = normalise_features(features, normalise)
    n = x.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(
            f"n_clusters must be between 1 and the number of patches ({n}), got {n_clusters}"
        )
    if method == "auto":
        method = "minibatch" if n > minibatch_threshold else "full"
    if method == "full":
        model = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed)
    elif method == "minibatch":
        model = MiniBatchKMeans(
            n_clusters=n_clusters,
            n_init=1,
            batch_size=2048,
            random_state=seed,
            max_no_improvement=10,
        )
    else:
        raise ValueError(f"method must be 'auto', 'full' or 'minibatch', got {method!r}")
    if method == "minibatch" and n > MINIBATCH_FIT_SIZE:
        subsample = np.random.default_rng(seed).choice(n, MINIBATCH_FIT_SIZE, replace=False)
        model.fit(x[np.sort(subsample)])
        raw = nearest_centre(x, model.cluster_centers_.astype(np.float32))
    else:
        raw = model.fit_predict(x)
    centres = model.cluster_centers_.astype(np.float32)
    # renumber by decreasing size, ties by old id
    sizes = np.bincount(raw, minlength=n_clusters)
    order = np.lexsort((np.arange(n_clusters), -sizes))
    remap = np.empty(n_clusters, dtype=np.int32)
    remap[order] = np.arange(n_clusters, dtype=np.int32)
    labels = remap[raw]
    centres = centres[order]
    # |x - c|² = |x|² + |c|² - 2 x·c, without an (N, D) temporary
    dots = np.take_along_axis(x @ centres.T, labels[:, None].astype(np.int64), axis=1)[:, 0]
    sq = np.einsum("ij,ij->i", x, x) + np.einsum("ij,ij->i", centres, centres)[labels] - 2 * dots
    dist = np.sqrt(np.maximum(sq, 0)).astype(np.float32)
    return ClusterResult(labels, centres, dist, method, normalise)


def cluster_table(
    labels: np.ndarray,
    patch_size_level0: int,
    mpp: float | None = None,
    coords: np.ndarray | PatchGrid | None = None,
) -> list[dict]:
    """Per-cluster patch count and area, one dict per cluster present, sorted by id.

    Keys: ``cluster``, ``count``, ``fraction`` (of labelled patches) and ``area_um2`` when
    ``mpp`` is known, else ``area_px2`` (level-0 pixels²). With ``coords`` the area is the
    union of the cluster's patch footprints, counted on raster cells, so overlapping grids are
    not double counted; without ``coords`` it is ``count × P²`` (valid only without overlap).
    Negative labels (unlabelled) are ignored.
    """
    lab = np.asarray(labels).reshape(-1)
    grid = None
    if coords is not None:
        grid = coords if isinstance(coords, PatchGrid) else patch_grid(coords, patch_size_level0)
        if grid.n_patches != lab.shape[0]:
            raise ValueError(f"got {lab.shape[0]} labels for {grid.n_patches} patches")
    px_area = 1.0 if mpp is None else float(mpp) ** 2
    key = "area_px2" if mpp is None else "area_um2"
    ids, counts = np.unique(lab[lab >= 0], return_counts=True)
    total = counts.sum()
    rows = []
    for cid, cnt in zip(ids.tolist(), counts.tolist()):
        if grid is None:
            area = cnt * float(patch_size_level0) ** 2
        else:
            area = float(grid.coverage(lab == cid).sum()) * grid.cell**2
        rows.append(
            {"cluster": int(cid), "count": int(cnt), "fraction": cnt / total, key: area * px_area}
        )
    return rows


def pca(
    features: np.ndarray, n_components: int = 2, seed: int = 0, normalise: Normalise = "l2"
) -> np.ndarray:
    """(N, n_components) float32 PCA projection (randomised SVD above 10,000 patches)."""
    from sklearn.decomposition import PCA

    x = normalise_features(features, normalise)
    solver = "randomized" if x.shape[0] > 10_000 else "auto"
    return (
        PCA(n_components, svd_solver=solver, random_state=seed).fit_transform(x).astype(np.float32)
    )


def umap_available() -> bool:
    """True when the optional ``umap-learn`` package is importable."""
    return importlib.util.find_spec("umap") is not None


def umap(
    features: np.ndarray,
    n_components: int = 2,
    seed: int = 0,
    normalise: Normalise = "l2",
    fit_size: int = 5_000,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> np.ndarray:
    """(N, n_components) float32 UMAP projection.

    Fitted on a seeded subsample of at most ``fit_size`` patches, then every patch is placed with
    ``transform``: minutes become seconds at 100,000 patches. Requires ``umap-learn``.
    """
    if not umap_available():
        raise ImportError(
            "UMAP needs the optional package umap-learn: pip install umap-learn "
            "(or pip install 'napari-gpfm[umap]'); PCA works without it"
        )
    import umap as umap_lib

    x = normalise_features(features, normalise)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    fit_idx = np.sort(rng.choice(n, fit_size, replace=False)) if n > fit_size else np.arange(n)
    reducer = umap_lib.UMAP(
        n_components=n_components,
        n_neighbors=min(n_neighbors, max(2, len(fit_idx) - 1)),
        min_dist=min_dist,
        metric="euclidean",  # on unit vectors this orders neighbours as cosine does
        random_state=seed,
        n_jobs=1,
    )
    emb = reducer.fit_transform(x[fit_idx])
    if len(fit_idx) == n:
        return emb.astype(np.float32)
    out = np.empty((n, n_components), dtype=np.float32)
    out[fit_idx] = emb
    rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
    out[rest] = reducer.transform(x[rest])
    return out
