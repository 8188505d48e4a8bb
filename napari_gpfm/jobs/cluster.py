"""k-means of patch embeddings as a job: a ``started`` and a ``done`` :class:`Progress`.

k-means (:func:`napari_gpfm.analyses.clusters.kmeans`) is one uninterruptible call, so the job
has two cancel points: before it starts (closing the generator after the ``started`` record
means it never runs) and after it (the result is dropped). Usage::

    result = yield from cluster_job(features, k=8)   # inside another generator, or
    gen = cluster_job(features, k=8)
    for p in gen: ...   # Progress(job="cluster", stage="clustering", ...); the generator's
                        # return value (StopIteration.value) is the ClusterResult
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from .progress import Progress

if TYPE_CHECKING:
    from ..analyses.clusters import ClusterResult

__all__ = ["cluster_job"]

JOB = "cluster"
STAGE = "clustering"


def cluster_job(
    features: Any,
    k: int,
    seed: int = 0,
    normalise: str | None = "l2",
    method: str = "auto",
) -> Generator[Progress, None, ClusterResult]:
    """Seeded k-means of ``features`` (N, D) into ``k`` clusters.

    Yields ``Progress(job="cluster", stage="clustering", status="started", total=N,
    unit="patches")`` before the fit and ``status="done"`` (``done == total == N``, ``data`` the
    :class:`~napari_gpfm.analyses.clusters.ClusterResult`) after it; returns that result.
    ``normalise`` and ``method`` are passed to :func:`~napari_gpfm.analyses.clusters.kmeans`.
    Raises ``ValueError`` (before any record) when ``k`` is not in ``1..N``.
    """
    from ..analyses.clusters import kmeans

    n = int(len(features))
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of patches ({n}), got {k}")
    yield Progress(JOB, STAGE, 0, n, status="started", unit="patches",
                   message=f"k-means of {n:,} patches into {k} clusters")
    t0 = time.perf_counter()
    result = kmeans(features, k, seed=seed, normalise=normalise, method=method)
    elapsed = time.perf_counter() - t0
    sizes = ", ".join(str(int(c)) for c in _sizes(result.labels, k))
    yield Progress(JOB, STAGE, n, n, rate=n / elapsed if elapsed > 0 else None, eta_s=0.0,
                   status="done", unit="patches", data=result,
                   message=f"{k} clusters ({result.method} k-means, {elapsed:.1f} s); "
                           f"sizes {sizes}")
    return result


def _sizes(labels: Any, k: int) -> list[int]:
    import numpy as np

    return np.bincount(np.asarray(labels), minlength=k).tolist()
