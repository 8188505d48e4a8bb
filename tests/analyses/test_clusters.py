"""k-means recovers planted tissue types; tables report counts and areas; projections work."""

import numpy as np
import pytest
from analyses_synthetic import planted_clusters

from napari_gpfm.analyses import clusters
from napari_gpfm.analyses.clusters import cluster_table, kmeans, pca


@pytest.fixture
def planted():
    return planted_clusters()


def _purity(labels, truth):
    return sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(truth)


@pytest.mark.parametrize("method", ["full", "minibatch"])
def test_kmeans_recovers_planted_clusters_and_is_seeded(method):
    x, y = planted_clusters(n_per=150, k=4, seed=1)
    res = kmeans(x, 4, seed=3, method=method)
    assert res.method == method
    assert res.labels.shape == (600,) and res.labels.dtype == np.int32
    assert res.centres.shape == (4, x.shape[1])
    assert _purity(res.labels, y) == 1.0
    # clusters numbered by decreasing size; distances are to the patch's own centre
    sizes = np.bincount(res.labels)
    assert np.all(np.diff(sizes) <= 0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(
        res.distances, np.linalg.norm(unit - res.centres[res.labels], axis=1), rtol=1e-5
    )
    again = kmeans(x, 4, seed=3, method=method)
    np.testing.assert_array_equal(res.labels, again.labels)


def test_auto_switches_to_minibatch_above_threshold():
    x, _ = planted_clusters(n_per=50, k=2)
    assert kmeans(x, 2, minibatch_threshold=1000).method == "full"
    assert kmeans(x, 2, minibatch_threshold=50).method == "minibatch"


def test_too_many_clusters_is_refused():
    x, _ = planted_clusters(n_per=2, k=2)
    with pytest.raises(ValueError, match="number of patches"):
        kmeans(x, 10)


def test_cluster_table_counts_union_area_without_double_counting_overlap():
    P, mpp = 100, 0.5
    # four patches on a stride-50 row: cluster 0 = first two, cluster 1 = last two
    coords = np.array([[0, 0], [50, 0], [100, 0], [150, 0]])
    labels = np.array([0, 0, 1, 1])
    rows = cluster_table(labels, P, mpp, coords)
    assert [r["cluster"] for r in rows] == [0, 1]
    assert [r["count"] for r in rows] == [2, 2]
    # each pair covers x 0..149 (150 px) × 100 px, not 2 × 100²
    assert rows[0]["area_um2"] == pytest.approx(150 * 100 * mpp**2)
    assert rows[1]["area_um2"] == pytest.approx(150 * 100 * mpp**2)
    no_coords = cluster_table(labels, P)
    assert no_coords[0]["area_px2"] == 2 * P * P


def test_pca_separates_planted_clusters(planted):
    x, y = planted
    emb = pca(x, 2)
    assert emb.shape == (len(y), 2) and emb.dtype == np.float32
    means = np.array([emb[y == c].mean(0) for c in range(4)])
    spread = max(emb[y == c].std(0).max() for c in range(4))
    gaps = [np.linalg.norm(means[i] - means[j]) for i in range(4) for j in range(i + 1, 4)]
    assert sorted(gaps)[-1] > 3 * spread


def test_umap_missing_names_the_package_to_install(monkeypatch, planted):
    monkeypatch.setattr(clusters, "umap_available", lambda: False)
    with pytest.raises(ImportError, match="pip install umap-learn"):
        clusters.umap(planted[0])


@pytest.mark.slow  # ~40 s, most of it numba compiling UMAP on first use
def test_umap_fits_a_subsample_and_places_every_patch(planted):
    x, y = planted
    emb = clusters.umap(x, fit_size=300, seed=0)
    assert emb.shape == (len(y), 2) and np.isfinite(emb).all()
