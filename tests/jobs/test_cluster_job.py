"""cluster_job: started/done records around k-means, its result, and closing before the fit."""

from __future__ import annotations

import numpy as np
import pytest

from jobs_helpers import assert_progress, drive
from napari_gpfm.analyses import clusters
from napari_gpfm.jobs import cluster_job


def _features(n_per: int = 40, k: int = 3, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    x = np.repeat(centres, n_per, axis=0) + 0.05 * rng.normal(size=(k * n_per, dim))
    return x.astype(np.float32)


def test_cluster_job_reports_and_returns_the_kmeans_result():
    x = _features()
    records, result = drive(cluster_job(x, 3, seed=1))
    assert_progress(records, "cluster")
    assert [r.status for r in records] == ["started", "done"]
    assert {r.stage for r in records} == {"clustering"}
    assert [(r.done, r.total) for r in records] == [(0, 120), (120, 120)]
    assert records[-1].data is result and records[-1].unit == "patches"
    expected = clusters.kmeans(x, 3, seed=1)
    assert np.array_equal(result.labels, expected.labels)
    assert np.allclose(result.centres, expected.centres)
    assert np.bincount(result.labels).tolist() == [40, 40, 40]


def test_cluster_job_passes_seed_and_options():
    x = np.random.default_rng(0).normal(size=(120, 16)).astype(np.float32)  # no clusters:
    _, result = drive(cluster_job(x, 5, seed=1, normalise="standard"))  # seeds matter here
    expected = clusters.kmeans(x, 5, seed=1, normalise="standard")
    assert np.array_equal(result.labels, expected.labels) and result.normalise == "standard"
    assert not np.array_equal(result.labels, clusters.kmeans(x, 5, seed=0).labels)


def test_closing_after_started_never_runs_kmeans(monkeypatch):
    calls = []
    monkeypatch.setattr(clusters, "kmeans", lambda *a, **k: calls.append(1))
    gen = cluster_job(_features(), 3)
    assert next(gen).status == "started"
    gen.close()
    assert calls == [] and gen.gi_frame is None
    with pytest.raises(ValueError, match=r"between 1 and the number of patches \(120\)"):
        next(cluster_job(_features(), 121))
