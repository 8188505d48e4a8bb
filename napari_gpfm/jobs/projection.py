"""2-D projections (PCA, UMAP) of a slide's embeddings for the embedding plot, as a job."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from .progress import Progress

__all__ = ["projection_job"]


def projection_job(state: Any, method: str = "pca", seed: int = 0
                   ) -> Generator[Progress, None, np.ndarray]:  # fmt: skip
    """(N, 2) coordinates of ``state``'s patches (anything with ``project(method, seed)``,
    ``n`` and ``name``, i.e. a session's slide state; results are cached there)."""
    label = {"pca": "PCA", "umap": "UMAP"}.get(method, method)
    yield Progress("projection", label, 0, 0, status="started",
                   message=f"{state.name}: {label} of {state.n:,} patches…")  # fmt: skip
    xy = state.project(method, seed=seed)
    yield Progress("projection", label, 1, 1, status="done",
                   message=f"{state.name}: {label} done")  # fmt: skip
    return xy
