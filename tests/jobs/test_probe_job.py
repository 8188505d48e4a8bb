"""probe_job over live_steps: Progress only, the same probe and prediction as live_steps, the
report, the "nothing to train" note, and closing before the cross-validation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from jobs_helpers import annotation, assert_progress, drive
from napari_gpfm.analyses import classify
from napari_gpfm.analyses.classify import LiveUpdate, ProbeRequest, live_steps
from napari_gpfm.jobs import ProbeResult, probe_job

NAMES = ["tumour", "stroma"]
COLOURS = np.array([[200, 0, 0], [0, 150, 0]])


@pytest.fixture(scope="module")
def store():
    """12 × 12 patches of 100 px; the left half's features sit around one direction, the right
    half's around another (plus noise), so a probe can learn them."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:12, 0:12]
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64) * 100
    centres = rng.normal(size=(2, 24))
    side = (coords[:, 0] >= 600).astype(int)
    features = (centres[side] + 0.8 * rng.normal(size=(144, 24))).astype(np.float32)
    return SimpleNamespace(path="fake.h5", coords=coords, patch_size_level0=100, mpp=0.5,
                           features=features, model="fake", slide_name="fake", embed_dim=24)


ANNS = [annotation("tumour", 0, 0, 400, 400), annotation("stroma", 800, 800, 1200, 1200)]


def test_probe_job_matches_live_steps(store):
    records, result = drive(probe_job(ProbeRequest(ANNS, store, NAMES, COLOURS, cv_folds=3)))
    assert_progress(records, "probe")
    assert [(r.stage, r.status, r.done, r.total) for r in records] == [
        ("training", "started", 0, 2), ("training", "running", 1, 2),
        ("cross-validating", "running", 2, 2), ("cross-validating", "done", 2, 2)]
    assert [type(r.data) for r in records[1:3]] == [LiveUpdate, LiveUpdate]
    assert [r.data.kind for r in records[1:3]] == ["prediction", "report"]
    assert isinstance(result, ProbeResult) and records[-1].data is result and result.trained

    direct = list(live_steps(ProbeRequest(ANNS, store, NAMES, COLOURS, cv_folds=3)))
    pred, report = direct[0], direct[1]
    assert np.array_equal(result.probe.predict_proba(store.features),
                          pred.probe.predict_proba(store.features))
    assert np.array_equal(result.prediction.labels, pred.prediction.labels)
    assert np.array_equal(result.prediction.proba, pred.prediction.proba)
    assert result.rasters.keys() == pred.rasters.keys() == {"classes", "entropy", "p:tumour",
                                                            "p:stroma"}
    assert np.array_equal(result.rasters["classes"].data, pred.rasters["classes"].data)
    assert result.labels.counts == {"tumour": 16, "stroma": 16}
    assert result.class_names == NAMES and result.colours.tolist() == COLOURS.tolist()
    assert result.report.balanced_accuracy == report.report.balanced_accuracy
    assert (result.prediction.labels[store.coords[:, 0] >= 600] == 1).mean() > 0.9
    assert "16" in records[1].message and "balanced accuracy" in records[-1].message


def test_one_class_is_a_note_and_no_probe(store):
    request = ProbeRequest(ANNS[:1], store, NAMES, COLOURS, cv_folds=3)
    records, result = drive(probe_job(request))
    assert_progress(records, "probe")
    assert [r.status for r in records] == ["started", "note", "done"]
    assert not result.trained and result.prediction is None and result.report is None
    assert result.labels.counts == {"tumour": 16, "stroma": 0}
    assert "at least two classes" in result.notes[0] and "tumour 16" in records[1].message
    assert records[-1].message == result.notes[0]


def test_closing_after_the_prediction_skips_cross_validation(store, monkeypatch):
    calls = []
    real = classify.cv_report
    monkeypatch.setattr(classify, "cv_report", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = probe_job(ProbeRequest(ANNS, store, NAMES, COLOURS, cv_folds=3))
    assert next(gen).status == "started" and next(gen).data.kind == "prediction"
    gen.close()
    assert calls == [] and gen.gi_frame is None
    drive(probe_job(ProbeRequest(ANNS, store, NAMES, COLOURS, cv_folds=3)))
    assert calls == [1]  # the counter does see a run to the end


def test_apply_job_classifies_each_slide_and_names_the_ones_it_cannot(store):
    from napari_gpfm.jobs.probe import apply_job

    _, trained = drive(probe_job(ProbeRequest(ANNS, store, NAMES, COLOURS, cv_folds=0)))
    other = SimpleNamespace(**{**vars(store), "model": "another-model", "path": "other.h5"})
    targets = [(1, "a", store), (2, "b", None), (3, "c", other)]
    records, results = drive(apply_job(trained.probe, targets))
    assert [(r.done, r.total, r.unit) for r in records] == [(0, 3, "slides"), (1, 3, "slides"),
                                                            (2, 3, "slides"), (3, 3, "slides")]
    assert [r.key for r in results] == [1, 2, 3]
    assert results[0].prediction is not None and results[0].problem is None
    assert np.array_equal(results[0].prediction.labels, trained.prediction.labels)
    assert results[1].prediction is None and "no embeddings" in results[1].message
    assert results[2].prediction is None and "another-model" in results[2].message
    assert records[2].data is results[1]


def test_closing_apply_job_stops_before_the_next_slide(store, monkeypatch):
    from napari_gpfm.jobs.probe import apply_job

    _, trained = drive(probe_job(ProbeRequest(ANNS, store, NAMES, COLOURS, cv_folds=0)))
    calls = []
    monkeypatch.setattr(type(trained.probe), "predict_store", lambda c, s: calls.append(s) or
                        classify.predict_features(c, s.features, s))
    gen = apply_job(trained.probe, [(1, "a", store), (2, "b", store)])
    next(gen)
    next(gen)  # the first slide
    gen.close()
    assert len(calls) == 1
