"""pathotune_job on the sample slide with a tiny random backbone: stages and records, the result
(class order, probe on the same split), predict-only, the two-class error, stop and close."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest
import torch
import yaml

from jobs_helpers import SAMPLE, annotation, assert_progress, drive
from tiny_models import layerscale_card
from napari_gpfm import pathotune as pt
from napari_gpfm.jobs import JobResult, NotEnoughClassesError, PathoTuneJob, pathotune_job
from napari_gpfm.jobs.pathotune import STAGES

MODEL = "jobs-tiny"
P = 224
# the sample slide is 2220 × 2967 px: a 9 × 13 grid of 224 px patches
COORDS = np.stack(np.meshgrid(np.arange(9) * P, np.arange(13) * P), -1).reshape(-1, 2)
# 3 × 2 patches of each class; stroma first in the annotations, tumour first in the palette
ANNS = [annotation("stroma", 0, 2240, 672, 2688), annotation("tumour", 896, 0, 1568, 448),
        annotation("Ignore*", 0, 0, 224, 224)]
NAMES = ["tumour", "stroma"]


@pytest.fixture(scope="module", autouse=True)
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs-models")
    (d / f"{MODEL}.yaml").write_text(yaml.safe_dump(layerscale_card(MODEL), sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
        mp.setenv("HF_HUB_OFFLINE", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield d
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """A TRIDENT-style feature file of the grid; its features separate the two classes."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(COORDS), 48)).astype(np.float32)
    features += np.where(COORDS[:, 1] >= 2240, 2.0, -2.0)[:, None]  # on every dimension
    path = tmp_path_factory.mktemp("store") / "sample.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        c = f.create_dataset("coords", data=COORDS.astype(np.int64))
        c.attrs["patch_size_level0"] = P
        c.attrs["level0_magnification"] = 10.0 / 0.499
    return str(path)


def make_job(store_path, annotations=ANNS, class_names=NAMES, epochs=2, **kw) -> PathoTuneJob:
    return PathoTuneJob(
        slide_path=str(SAMPLE), mpp=None, model=MODEL, allow_random=True,
        annotations=annotations, class_names=class_names, store_path=store_path,
        prompt_config=pt.PromptConfig(tvp=True, n_tvp=2, ttp=False, ivp=False),
        template=pt.TextTemplate(),
        train_config=pt.TrainConfig(epochs=epochs, batch_size=4, val_fraction=0.34,
                                    augment=False, device="cpu", patience=5),
        num_workers=0, **kw)


@pytest.fixture(scope="module")
def trained(store_path):
    return drive(pathotune_job(make_job(store_path)))


def test_records_follow_the_stages(trained):
    records, result = trained
    assert_progress(records, "pathotune")
    stages = [r.stage for r in records]
    assert sorted(set(stages), key=stages.index) == list(STAGES)
    assert stages == sorted(stages, key=STAGES.index)  # each stage once, in order
    for stage in STAGES:
        sub = [r for r in records if r.stage == stage]
        assert sub[0].status == "started" and sub[-1].status == "done", stage
        assert [r.done for r in sub] == sorted(r.done for r in sub), stage
    reading = [r for r in records if r.stage == "reading patches"]
    assert reading[-1].done == reading[-1].total == 12 and reading[-1].unit == "patches"
    assert reading[0].data.counts == {"tumour": 6, "stroma": 6}
    assert "tumour 6, stroma 6" in reading[0].message
    training = [r for r in records if r.stage == "training" and r.status != "started"]
    steps = [r for r in training if r.data.status == "step"]
    epochs = [r for r in training if r.data.status == "epoch"]
    assert len(steps) == 4 and len(epochs) == 2  # 8 training patches, batch 4, 2 epochs
    assert all(r.total == 4 and r.unit == "steps" for r in training)
    assert all(r.rate and r.rate > 0 and r.eta_s is not None for r in steps)
    assert steps[0].eta_s == pytest.approx(3 / steps[0].rate)
    assert training[-1].done == 4 and training[-1].data.status == "done"
    assert epochs[-1].data.val_bal_acc is not None and "validation" in epochs[-1].message
    predicting = [r for r in records if r.stage == "predicting"]
    assert predicting[-1].done == predicting[-1].total == 117
    assert [r.data.status for r in predicting[1:]] == ["running"] * 4 + ["done"]


def test_result_keeps_palette_order_and_compares_the_probe(trained):
    _, result = trained
    assert isinstance(result, JobResult) and not result.cancelled
    assert result.classifier.class_names == NAMES and result.labels.class_names == NAMES
    assert result.n_labelled == 12 and result.train.val_indices.size == 4
    assert result.probe_val_bal_acc == 1.0  # the store's features separate the classes
    pred = result.prediction
    assert pred.proba.shape == (117, 2) and np.isfinite(pred.proba).all()
    assert np.array_equal(pred.coords, COORDS)
    tiles = result.classifier.info["tiles"]
    assert tiles["patch_size_level0"] == P and tiles["n_labelled"] == 12


def test_predict_only_with_the_trained_classifier(trained, store_path):
    _, first = trained
    records, result = drive(pathotune_job(make_job(store_path, classifier=first.classifier)))
    assert_progress(records, "pathotune", first="skipped")
    assert [r.stage for r in records if r.status in ("started", "skipped")] == [
        "loading backbone", "predicting"]
    assert result.train is None and result.classifier is first.classifier
    assert np.allclose(result.prediction.proba, first.prediction.proba, atol=1e-6)

    # without a store: the backbone card's tiling (224 px at 0.5 µm/px) over detected tissue
    from napari_gpfm.embeddings import default_spec
    from napari_gpfm.slide import open_slide
    from napari_gpfm.tiles import detect_tissue, make_grid

    _, on_tissue = drive(pathotune_job(make_job(None, classifier=first.classifier)))
    slide, enc = open_slide(SAMPLE), first.classifier.encoder
    grid = make_grid(slide, default_spec(enc), detect_tissue(slide), encoder_input=56)
    assert np.array_equal(on_tissue.prediction.coords, grid.coords) and len(grid.coords) > 20
    assert on_tissue.prediction.patch_size_level0 == grid.patch_size_level0


def test_fewer_than_two_labelled_classes_is_an_error_naming_the_counts(store_path):
    # stroma's shape covers under half of each patch it touches: no stroma patch is labelled
    anns = [ANNS[1], annotation("stroma", 0, 2240, 100, 2688)]
    records = []
    gen = pathotune_job(make_job(store_path, anns))
    with pytest.raises(NotEnoughClassesError,
                       match=r"at least two classes; labelled patches per class: tumour 6, "
                             r"stroma 0"):
        for r in gen:
            records.append(r)
    assert {r.stage for r in records} == {"loading backbone"}  # nothing read or trained
    with pytest.raises(NotEnoughClassesError,  # and says which shapes were left out
                       match=r"per class: tumour 6; shapes of classes \['Other'\] were skipped"):
        drive(pathotune_job(make_job(store_path, [ANNS[1], annotation("Other", 5, 5, 9, 9)],
                                     class_names=["tumour"])))
    with pytest.raises(NotEnoughClassesError, match=r"per class: tumour 6\. Annotate"):
        drive(pathotune_job(make_job(store_path, ANNS[1:], class_names=None)))  # from shapes


def _watch_heads(monkeypatch) -> tuple[list, list]:
    """Capture classifiers built by training and count their forward passes."""
    built, calls = [], []
    real = pt.train.build_classifier

    def build(*a, **k):
        clf = real(*a, **k)
        clf.model.head.register_forward_hook(lambda *_: calls.append(1))
        built.append(clf)
        return clf

    monkeypatch.setattr(pt.train, "build_classifier", build)
    return built, calls


def test_closing_mid_training_stops_at_once(store_path, monkeypatch, tmp_path):
    built, calls = _watch_heads(monkeypatch)
    gen = pathotune_job(make_job(store_path, epochs=50))
    for r in gen:
        if r.stage == "training" and r.status == "running":
            break
    assert r.data.status == "step" and r.done == 1 and len(calls) == 1
    gen.close()
    assert gen.gi_frame is None and len(calls) == 1  # not one more step
    assert not built[0].model.training  # the trainer's cleanup ran (best weights, eval mode)


def test_stop_event_cancels_training_and_closing_stops_prediction(store_path, monkeypatch):
    built, calls = _watch_heads(monkeypatch)
    stop = threading.Event()

    def stop_after_first_step(r):
        if r.stage == "training" and r.status == "running":
            stop.set()

    records, result = drive(pathotune_job(make_job(store_path, epochs=50), stop),
                            stop_after_first_step)
    assert_progress(records, "pathotune")
    assert records[-1].stage == "training" and records[-1].data.status == "cancelled"
    assert len(calls) == 1 and result.cancelled and result.train.cancelled
    assert result.prediction is None and result.classifier is built[0]

    stop = threading.Event()

    def stop_after_first_batch(r):
        if r.stage == "predicting" and r.status == "running":
            stop.set()

    records, result = drive(pathotune_job(make_job(store_path, classifier=built[0]), stop),
                            stop_after_first_batch)
    assert len(calls) == 2 and result.prediction is None and result.cancelled
    assert records[-1].stage == "predicting" and records[-1].data.status == "cancelled"
    assert records[-1].done == 32 and "cancelled after 32 of 117" in records[-1].message

    gen = pathotune_job(make_job(store_path, classifier=built[0]))
    for r in gen:
        if r.stage == "predicting" and r.status == "running":
            break
    assert r.done == 32 and len(calls) == 3  # one batch of 32 patches predicted
    gen.close()
    assert len(calls) == 3 and gen.gi_frame is None
