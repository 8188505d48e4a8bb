"""Linear probes: learn separable tissue, report CV honestly, and travel safely in files."""

import numpy as np
import pytest
from analyses_synthetic import planted_clusters

from napari_gpfm.analyses.probe import (
    ProbeFileError,
    RecipeMismatchError,
    cv_report,
    fit_probe,
    load_probe,
)

CLASSES = ["tumour", "stroma", "necrosis", "fat"]
RECIPE = {
    "model": "gpfm",
    "weights_sha256": "ab" * 32,
    "target_mpp": 0.5,
    "patch_size": 224,
    "overlap": 0,
}


@pytest.fixture
def data():
    return planted_clusters(n_per=60, k=4, dim=32, noise=0.6, seed=4)


def test_probe_beats_chance_and_gives_probabilities(data):
    x, y = data
    probe = fit_probe(x[::2], y[::2], CLASSES)
    proba = probe.predict_proba(x[1::2])
    assert proba.shape == (len(y) // 2, 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert np.mean(probe.predict(x[1::2]) == y[1::2]) > 0.9  # chance is 0.25
    # folded fast path agrees with the sklearn pipeline it stands for
    np.testing.assert_allclose(proba, probe.pipeline.predict_proba(x[1::2]), atol=1e-4)


def test_entropy_is_low_on_typical_patches_and_high_between_classes(data):
    x, y = data
    probe = fit_probe(x, y, CLASSES)
    typical = x[y == 0].mean(0, keepdims=True)
    between = (x[y == 0].mean(0) + x[y == 1].mean(0))[None] / 2
    h = probe.entropy(np.vstack([typical, between]))
    assert 0 <= h[0] < h[1] <= 1


def test_absent_classes_get_zero_probability_and_unlabelled_rows_are_skipped(data):
    x, y = data
    y = y.copy()
    y[y == 3] = -1  # "fat" not labelled yet
    probe = fit_probe(x, y, CLASSES)
    assert probe.n_train == int(np.sum(y >= 0))
    assert np.all(probe.predict_proba(x)[:, 3] == 0)


def test_binary_probe_and_names_as_labels(data):
    x, y = data
    keep = y < 2
    names = np.array(CLASSES)[y[keep]]
    probe = fit_probe(x[keep], names, CLASSES[:2])
    assert probe.coef.shape[0] == 1
    assert np.mean(probe.predict(x[keep]) == y[keep]) > 0.9


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="at least two classes"):
        fit_probe(np.zeros((4, 3)), [0, 0, 0, 0], CLASSES)


def test_cv_report_shapes_and_scores(data):
    x, y = data
    rep = cv_report(x, y, folds=5, seed=0, class_names=CLASSES)
    assert rep.folds == 5 and len(rep.fold_balanced_accuracy) == 5 and rep.note == ""
    assert rep.confusion.shape == (4, 4) and rep.confusion.sum() == len(y)
    assert set(rep.per_class_recall) == set(CLASSES)
    assert rep.balanced_accuracy > 0.9
    # without names, integer labels are named by their value
    assert cv_report(x, y, folds=3).class_names == ["0", "1", "2", "3"]


def test_cv_reduces_folds_for_rare_classes_and_says_so(data):
    x, y = data
    rare = np.concatenate([np.nonzero(y != 3)[0], np.nonzero(y == 3)[0][:3]])
    rep = cv_report(x[rare], y[rare], folds=5, class_names=CLASSES)
    assert rep.folds == 3
    assert "'fat' has only 3" in rep.note
    with pytest.raises(ValueError, match="'fat' has only 1"):
        cv_report(x[rare[:-2]], y[rare[:-2]], class_names=CLASSES)


def test_probe_file_round_trip_gives_identical_predictions(tmp_path, data):
    x, y = data
    colours = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]]
    probe = fit_probe(x, y, CLASSES, colours=colours, recipe=RECIPE)
    path = probe.save(tmp_path / "tumour.probe")
    loaded = load_probe(path, expected_recipe=RECIPE)
    assert loaded.class_names == CLASSES
    np.testing.assert_array_equal(loaded.colours, colours)
    np.testing.assert_array_equal(loaded.predict_proba(x), probe.predict_proba(x))
    assert loaded.recipe["overlap"] == 0


def test_probe_from_another_recipe_is_refused_naming_file_and_keys(tmp_path, data):
    x, y = data
    path = fit_probe(x, y, CLASSES, recipe=RECIPE).save(tmp_path / "p.npz")
    other = dict(RECIPE, model="uni", target_mpp=1.0)
    with pytest.raises(RecipeMismatchError) as err:
        load_probe(path, expected_recipe=other)
    msg = str(err.value)
    assert str(path) in msg and "model" in msg and "target_mpp" in msg and "patch_size" not in msg
    # a float that only differs by rounding is the same mpp
    load_probe(path, expected_recipe=dict(RECIPE, target_mpp=0.5 + 1e-12))


def test_corrupt_probe_file_is_refused(tmp_path, data):
    x, y = data
    path = tmp_path / "p.npz"
    fit_probe(x, y, CLASSES).save(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["coef"] = arrays["coef"] * 2
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(ProbeFileError, match="sha256"):
        load_probe(path)
    (tmp_path / "junk.npz").write_text("not a probe")
    with pytest.raises(ProbeFileError, match="junk.npz"):
        load_probe(tmp_path / "junk.npz")


def test_warm_start_from_previous_probe_converges_to_the_same_answer(data):
    x, y = data
    first = fit_probe(x[:200], y[:200], CLASSES)
    again = fit_probe(x, y, CLASSES, previous=first)
    cold = fit_probe(x, y, CLASSES)
    assert np.mean(again.predict(x) == cold.predict(x)) > 0.97


def test_holdout_score_uses_exactly_the_given_split():
    """The PathoTune dock compares against the probe on its own train/validation patches."""
    from napari_gpfm.analyses.probe import holdout_balanced_accuracy

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    X = rng.normal(size=(60, 8)) + np.eye(3, 8)[y] * 6
    train, val = np.arange(0, 60, 2), np.arange(1, 60, 2)
    assert holdout_balanced_accuracy(X, y, train, val, ["a", "b", "c"]) == 1.0
    y_bad = y.copy()
    y_bad[val] = (y[val] + 1) % 3  # validation labels that the training patches contradict
    assert holdout_balanced_accuracy(X, y_bad, train, val, ["a", "b", "c"]) == 0.0
    assert holdout_balanced_accuracy(X, y, train, np.array([], int), ["a", "b", "c"]) is None
