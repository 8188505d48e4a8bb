"""Synthetic, structured embeddings shared by the analyses tests."""

import numpy as np


def planted_clusters(
    n_per: int = 200, k: int = 4, dim: int = 64, noise: float = 0.35, seed: int = 0
):
    """Embeddings drawn around k random unit directions, with their true cluster ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(k), n_per)
    x = centres[y] + noise * rng.normal(size=(k * n_per, dim)) / np.sqrt(dim)
    # random per-patch norms: cosine-based methods must not care
    x *= rng.uniform(0.5, 3.0, size=(len(y), 1))
    return x.astype(np.float32), y
