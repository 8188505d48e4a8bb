"""Similarity search finds the query's own tissue type first, in one store or several."""

import numpy as np
import pytest
from analyses_synthetic import planted_clusters

from napari_gpfm.analyses.similarity import ModelMismatchError, MultiStoreIndex, SimilarityIndex


@pytest.fixture
def planted():
    return planted_clusters()


def test_scores_peak_at_the_query_patch_and_rank_its_cluster_first(planted):
    x, y = planted
    ix = SimilarityIndex(x, model="gpfm")
    scores = ix.query(17)
    assert scores.shape == (len(y),) and scores.dtype == np.float32
    assert int(np.argmax(scores)) == 17
    assert scores[17] == pytest.approx(1.0, abs=1e-5)
    idx, top = ix.top_k(scores, 50, exclude=[17])
    assert 17 not in idx and len(idx) == 50
    assert np.all(np.diff(top) <= 0)
    assert np.all(y[idx] == y[17])


def test_cosine_ignores_embedding_norm():
    x, _ = planted_clusters(n_per=20)
    a = SimilarityIndex(x).query(3)
    b = SimilarityIndex(x * 7.5).query(3)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_several_queries_average_normalised_embeddings(planted):
    x, _ = planted
    ix = SimilarityIndex(x)
    # a vector query equals the same patches given by index, whatever their scale
    np.testing.assert_allclose(
        ix.query([1, 2, 3]), ix.query(x[[1, 2, 3]] * [[1.0], [10.0], [0.1]]), atol=1e-5
    )
    with pytest.raises(IndexError, match="out of range"):
        ix.query([len(x)])


def test_multi_store_ranks_across_stores():
    x, y = planted_clusters(n_per=50, seed=2)
    a, b = x[:100], x[100:]
    multi = MultiStoreIndex(
        {"slide_a": SimilarityIndex(a, "gpfm"), "slide_b": SimilarityIndex(b, "gpfm")}
    )
    scores = multi.query({"slide_a": [0, 1]})
    assert set(scores) == {"slide_a", "slide_b"}
    hits = multi.top_k(scores, 5, exclude={"slide_a": [0, 1]})
    assert len(hits) == 5 and all(s1 >= s2 for (_, _, s1), (_, _, s2) in zip(hits, hits[1:]))
    assert all(y[i if store == "slide_a" else 100 + i] == y[0] for store, i, _ in hits)


def test_stores_of_different_models_are_refused():
    x, _ = planted_clusters(n_per=5)
    with pytest.raises(ModelMismatchError, match="different models.*'gpfm'.*'uni'"):
        MultiStoreIndex({"a": SimilarityIndex(x, "gpfm"), "b": SimilarityIndex(x, "uni")})
