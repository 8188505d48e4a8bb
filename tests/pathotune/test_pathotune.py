"""PathoTune: token bookkeeping, frozen backbone, text prompts, training, files, cancel, slides.

A tiny random ViT (width 48, depth 3, 56 px, patch 14 → 16 patches, no LayerScale so every block
matters) stands in for GPFM; the 32 labelled CRC-VAL-HE-7K tiles (8 classes) are the data.
"""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny_models import FakeText, layerscale_card

from napari_gpfm import pathotune as pt
from napari_gpfm.analyses.classifier import PatchSet
from napari_gpfm.pathotune.train import augment_batch

# shared/ sits beside the repository (see ../shared/data/SOURCES.md)
TILES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tiles" / "crc-he"
REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"
@pytest.fixture(scope="module", autouse=True)
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt-models")
    for name, depth in (("pt-tiny", 3), ("pt-tiny-d2", 2)):
        card = layerscale_card(name, depth)
        (d / f"{name}.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
        mp.setenv("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(1)
        yield d


@pytest.fixture(scope="module")
def encoder(models_dir):
    from napari_gpfm.encoders import load_encoder

    return load_encoder("pt-tiny", allow_random=True, seed=0)


def _need_tiles():
    if not (TILES / "labels.csv").exists():
        pytest.skip(f"labelled CRC tiles not found at {TILES} (shared/ beside the repository)")


@pytest.fixture(scope="module")
def crc():
    """(uint8 (32, 56, 56, 3) tiles, labels, class names) from labels.csv."""
    _need_tiles()
    with open(TILES / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = np.stack([np.asarray(Image.open(TILES / r["file"]).convert("RGB")
                                  .resize((56, 56), Image.BILINEAR)) for r in rows])
    labels = [r["label"] for r in rows]
    return images, labels, sorted(set(labels))


CONFIGS = {
    "none": pt.PromptConfig(tvp=False, ttp=False, ivp=False),
    "TVP": pt.PromptConfig(tvp=True, n_tvp=5, ttp=False, ivp=False),
    "TVP+TTP": pt.PromptConfig(n_tvp=5, ttp=True, ivp=False),
    "all": pt.PromptConfig(n_tvp=5, ttp=True, ivp=True, n_ivp=3, ivp_block=1),
}


def _classifier(encoder, config, classes=("a", "b", "c")):
    return pt.build_classifier(encoder, list(classes), config, text_encoder=FakeText())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_tokens_reach_every_block(encoder, name):
    config = CONFIGS[name]
    clf = _classifier(encoder, config)
    model = clf.model
    seen: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i, blk in enumerate(model.trunk.blocks)]
    try:
        logits = model(torch.randn(2, 3, 56, 56))
    finally:
        for h in hooks:
            h.remove()
    assert logits.shape == (2, 3)
    n_tvp = 5 if config.tvp else 0
    n_ttp = 1 + 3 if config.ttp else 0  # the whole task + one sentence per class
    assert sorted(seen) == [0, 1, 2]
    for i, x in seen.items():
        n_ivp = 3 if config.ivp and i >= 1 else 0
        assert x.shape == (2, 1 + n_tvp + n_ttp + n_ivp + 16, 48), (name, i)
        assert model.layout(i, 16).total == x.shape[1]
        if n_tvp:  # block i sees its own deep prompts, not block i-1's outputs
            assert torch.equal(x[:, 1 : 1 + n_tvp], model.tvp.prompts[i].expand(2, -1, -1))
        if n_ttp and i == 0:
            assert torch.allclose(x[:, 1 + n_tvp : 1 + n_tvp + n_ttp], model.ttp(2))


def test_backbone_frozen_and_prompts_get_gradients(encoder):
    clf = _classifier(encoder, CONFIGS["all"])
    model = clf.model
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    model.train()
    assert not model.backbone.training and all(not m.training for m in model.backbone.modules())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 56, 56)),
                                             torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    for part in (model.tvp, model.ttp, model.ivp, model.head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), type(part).__name__
        assert sum(float(g.abs().sum()) for g in grads) > 0, type(part).__name__
    assert model.tvp.prompts.grad[0].abs().sum() > 0 and model.tvp.prompts.grad[-1].abs().sum() > 0
    after = encoder.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.n_trainable() < model.n_backbone()


def test_text_prompts_follow_the_template(encoder):
    classes = ["tumour", "stroma"]
    a = pt.TextTemplate(tissue="colorectal")
    b = pt.TextTemplate(template="a {stain} slide of {tissue} showing {classes}", tissue="breast")
    assert a.sentences(classes)[0] == (
        "an H&E stained image of colorectal tissue for tissue-type classification: tumour, stroma"
    )
    clf = pt.build_classifier(encoder, classes, CONFIGS["TVP+TTP"], template=a)  # real MiniLM
    assert clf.model.ttp.text.shape == (3, 384)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens_a, out_a = clf.model.ttp(1).clone(), clf.model(x)
    clf.set_template(b)
    with torch.no_grad():
        tokens_b, out_b = clf.model.ttp(1), clf.model(x)
    assert clf.sentences[0] == "a H&E slide of breast showing tumour, stroma"
    assert tokens_a.shape == tokens_b.shape
    assert not torch.allclose(tokens_a, tokens_b) and not torch.allclose(out_a, out_b)
    with pytest.raises(ValueError, match=r"unknown placeholder.*\{organ\}"):
        pt.TextTemplate(template="an image of {organ}")


def test_training_on_labelled_tiles_beats_chance(encoder, crc):
    images, labels, classes = crc
    records = []
    gen = pt.train_from_arrays(encoder, images, labels, classes, pt.TuneOptions(
        CONFIGS["all"], train_config=pt.TrainConfig(
            epochs=30, batch_size=16, lr=3e-2, val_fraction=0.0, augment=False, seed=0),
        text_encoder=FakeText()))
    result = pt.run(gen, records.append)
    assert records[-1].status == "done" and sum(r.status == "step" for r in records) == 60
    assert result.val_bal_acc is None and len(result.history) == 30
    proba = pt.predict_arrays(result.classifier, images)
    assert np.allclose(proba.sum(1), 1, atol=1e-5)
    acc = float(np.mean(np.asarray(classes)[proba.argmax(1)] == np.asarray(labels)))
    assert acc > 0.5, f"training accuracy {acc:.2f} after 60 steps (chance 0.125)"


def test_validation_split_and_early_stopping(encoder, crc):
    images, labels, classes = crc
    cfg = pt.TrainConfig(epochs=20, batch_size=16, lr=0.0, val_fraction=0.25, patience=2)
    records = []
    result = pt.run(pt.train_from_arrays(encoder, images, labels, classes,
                                         pt.TuneOptions(CONFIGS["TVP"], train_config=cfg)),
                    records.append)
    assert records[-1].status == "stopped-early" and result.stopped_early
    assert len(result.history) == 3 and result.best_epoch == 1  # nothing can improve at lr 0
    assert result.val_indices.size == 8 and result.train_indices.size == 24  # 1 of 4 per class
    assert set(np.asarray(labels)[result.val_indices]) == set(classes)
    assert 0.0 <= records[-1].best_val_bal_acc <= 1.0
    assert result.classifier.info["training"]["n_val"] == 8


def test_save_load_round_trip_and_backbone_refusal(encoder, crc, tmp_path):
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.jobs.classifiers import load_classifier

    images, labels, classes = crc
    clf = pt.build_classifier(encoder, classes, CONFIGS["all"], text_encoder=FakeText(),
                              colours=np.arange(24).reshape(8, 3), seed=3)
    with torch.no_grad():  # make the file hold non-initial values
        clf.model.head.weight.normal_(0, 0.5)
    path = clf.save(tmp_path / "clf")
    assert path.name == "clf.safetensors"
    header = pt.read_header(path)
    assert header["backbone"]["name"] == "pt-tiny" and header["class_names"] == classes
    assert header["backbone"]["weights_sha256"] == encoder.weights_sha256
    expected = pt.predict_arrays(clf, images[:6])
    same = pt.load_pathotune(path, encoder)
    assert np.array_equal(pt.predict_arrays(same, images[:6]), expected)
    rebuilt = load_classifier(path)  # the one loader; backbone rebuilt from the card (seed 0)
    assert rebuilt.kind == "pathotune"
    assert np.allclose(pt.predict_arrays(rebuilt, images[:6]), expected, atol=1e-6)
    assert same.sentences == clf.sentences and same.colours.tolist() == clf.colours.tolist()

    with pytest.raises(pt.BackboneMismatchError, match="weights_sha256") as err:
        pt.load_pathotune(path, load_encoder("pt-tiny", allow_random=True, seed=1))
    assert str(path) in str(err.value) and "different backbone" in str(err.value)
    with pytest.raises(pt.BackboneMismatchError, match="depth"):
        pt.load_pathotune(path, load_encoder("pt-tiny-d2", allow_random=True, seed=0))
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(pt.ClassifierFileError, match="damaged"):
        load_classifier(path, encoder=encoder)


def test_cancel_stops_within_one_step(encoder, crc):
    images, labels, classes = crc
    cfg = pt.TrainConfig(epochs=5, batch_size=4, val_fraction=0.0, augment=False)
    clf = _classifier(encoder, CONFIGS["TVP"], classes)
    calls = []
    clf.model.head.register_forward_hook(lambda *a: calls.append(1))
    stop = threading.Event()
    gen = pt.tune(clf, images, labels, cfg, stop_event=stop)
    first = next(gen)
    assert first.status == "step" and len(calls) == 1
    stop.set()
    rest = list(gen)
    assert len(calls) == 1 and [r.status for r in rest] == ["cancelled"]

    clf2 = _classifier(encoder, CONFIGS["TVP"], classes)
    calls.clear()
    clf2.model.head.register_forward_hook(lambda *a: calls.append(1))
    gen = pt.tune(clf2, images, labels, cfg)
    next(gen)
    gen.close()  # GeneratorExit at the yield: nothing more runs
    assert len(calls) == 1 and not clf2.model.training


def test_predict_slide_is_aligned_with_coords(encoder):
    from napari_gpfm.slide import open_slide

    clf = _classifier(encoder, CONFIGS["all"])
    coords = np.array([[0, 0], [224, 0], [448, 224], [672, 448], [896, 896], [1120, 1344]])
    slide = open_slide(SAMPLE)
    tiles = np.stack([slide.read_patch(int(x), int(y), 224, 56) for x, y in coords])
    expected = pt.predict_arrays(clf, tiles)
    records = []
    patches = PatchSet(str(SAMPLE), coords, 224)
    result = pt.run(pt.predict_slide(clf, patches, batch_size=2, num_workers=1), records.append)
    assert result.complete and records[-1].status == "done" and records[-2].done == 6
    assert np.allclose(result.proba, expected, atol=1e-5)
    assert result.labels.tolist() == expected.argmax(1).tolist()
    stop = threading.Event()
    stop.set()
    cancelled = pt.run(pt.predict_slide(clf, patches, batch_size=2, num_workers=0,
                                        stop_event=stop))
    assert not cancelled.complete and (cancelled.labels == -1).all()
    assert np.isnan(cancelled.entropy).all() and (cancelled.columns()["class_name"] == "").all()


def test_stratified_split_and_augmentation():
    y = np.array([0] * 4 + [1] * 4 + [2] * 1 + [-1] * 3)
    tr, va = pt.stratified_split(y, 0.25, seed=0)
    assert np.bincount(y[va], minlength=3).tolist() == [1, 1, 0]
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(9))
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    out = augment_batch(x, torch.Generator().manual_seed(0), mean, std, jitter=0.0)
    for i in range(2):  # a pure dihedral transform of each image
        dihedral = [torch.rot90(x[i], r, (-2, -1)).flip(-1) if f else torch.rot90(x[i], r, (-2, -1))
                    for r in range(4) for f in (0, 1)]
        assert any(torch.equal(out[i], d) for d in dihedral)


def test_cli_train_and_predict_tiles(models_dir, tmp_path):
    import argparse

    from napari_gpfm.pathotune import _cli as pathotune_cli

    _need_tiles()
    with open(TILES / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] in ("ADI", "LYM")]
    table = tmp_path / "tiles.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows([[str(TILES / r["file"]), r["label"]] for r in rows])
    parser = argparse.ArgumentParser(prog="napari-gpfm")
    pathotune_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "clf.safetensors"
    args = parser.parse_args(["pathotune", "train", "--model", "pt-tiny", "--allow-random-weights",
                              "--tiles-csv", str(table), "--out", str(out), "--no-ttp",
                              "--epochs", "2", "--device", "cpu"])
    assert args.func(args) == 0 and out.exists()
    assert pt.read_header(out)["class_names"] == ["ADI", "LYM"]
    pred = tmp_path / "pred.csv"
    args = parser.parse_args(["pathotune", "predict", "--classifier", str(out), "--tiles-csv",
                              str(table), "--out", str(pred)])
    assert args.func(args) == 0
    with open(pred, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["x", "y", "file", "class", "class_name", "prob_ADI", "prob_LYM",
                            "uncertainty"]
    assert len(got) == 8 and {r["class_name"] for r in got} <= {"ADI", "LYM"}
    assert all(abs(float(r["prob_ADI"]) + float(r["prob_LYM"]) - 1) < 1e-5 for r in got)


def test_predict_store_refuses_other_patch_geometry(encoder):
    from types import SimpleNamespace

    clf = _classifier(encoder, CONFIGS["TVP"])
    clf.info["tiles"] = {"patch_size_level0": 224, "mpp": 0.5}
    coords = np.array([[0, 0], [224, 0]])
    store = SimpleNamespace(path="slide.h5", coords=coords, patch_size_level0=448, mpp=0.5)
    with pytest.raises(pt.GeometryMismatchError, match=r"slide\.h5.*224\.0 µm.*112\.0 µm"):
        clf.predict_store(store, slide_path=SAMPLE)
    store = SimpleNamespace(path="slide.h5", coords=coords, patch_size_level0=448, mpp=0.25)
    with pytest.raises(pt.GeometryMismatchError, match="records no slide file"):
        clf.predict_store(store)  # no pixels to read
    result = clf.predict_store(store, slide_path=SAMPLE, num_workers=0)
    assert result.proba.shape == (2, 3) and result.patch_size_level0 == 448
