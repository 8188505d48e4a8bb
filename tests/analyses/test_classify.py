"""Classifiers from annotations on the sample slide: train, predict, outputs, recipe refusal, CLI."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from napari_gpfm.analyses.classify import (
    ProbeRequest,
    check_recipe,
    labels_for_store,
    live_steps,
    train_probe,
    write_outputs,
)
from napari_gpfm.jobs.classifiers import load_classifier
from napari_gpfm.analyses.classifier import Classifier
from napari_gpfm.analyses.probe import RecipeMismatchError, fit_probe, load_probe
from napari_gpfm.annotations.geojson import Annotation, read_geojson, write_geojson
from level0_shapes import rect
from tiny_models import embed_sample, tiny_card

TINY = "tiny-test"
TINY_CARD = tiny_card(TINY, 112)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    (d / "tiny-test.yaml").write_text(TINY_CARD)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
        yield d


@pytest.fixture(scope="module")
def store(models_dir, sample_svs, tmp_path_factory):
    """A real feature store of the sample slide (tiny random ViT, 112 px at 0.5 µm/px)."""
    return embed_sample(sample_svs, TINY, tmp_path_factory.mktemp("features"))


def split_annotations(store, colours=True):
    """Left third of the tissue = Tumor, right third = Stroma, a corner = Ignore*."""
    c, P = store.coords, store.patch_size_level0
    xs = np.sort(np.unique(c[:, 0]))
    lo, hi = xs[len(xs) // 3], xs[2 * len(xs) // 3]
    y0, y1 = c[:, 1].min(), c[:, 1].max() + P
    return [
        Annotation([[rect(c[:, 0].min(), y0, lo, y1)]], class_name="Tumor",
                   color=(200, 0, 0) if colours else None),
        Annotation([[rect(hi, y0, c[:, 0].max() + P, y1)]], class_name="Stroma",
                   color=(150, 200, 150) if colours else None),
        Annotation([[rect(lo, y0, lo + P, y0 + P)]], class_name="Ignore*", color=(180, 180, 180)),
    ]


def test_labels_train_predict_class_map_aligned_with_slide(store, tmp_path):
    anns = split_annotations(store)
    names = ["Tumor", "Stroma"]
    labels = labels_for_store(anns, store, names)
    assert labels.excluded_classes == ["Ignore*"]
    c, P, mpp = store.coords, store.patch_size_level0, store.mpp
    assert (labels.labels[c[:, 0] + P <= c[:, 0].min() + (P * 2)] == 0).all()
    assert labels.counts["Tumor"] > 5 and labels.counts["Stroma"] > 5

    res = train_probe(anns, store, names, [(200, 0, 0), (150, 200, 150)], cv_folds=3)
    assert res.report is not None and 0.0 <= res.report.balanced_accuracy <= 1.0
    assert res.report.confusion.sum() == (labels.labels >= 0).sum()
    assert res.classifier.recipe["model"] == TINY and res.classifier.recipe["patch_size"] == 112
    assert res.val_bal_acc == res.report.balanced_accuracy

    pred = res.classifier.predict_store(store)
    assert pred.proba.shape == (store.n_patches, 2)
    np.testing.assert_allclose(pred.proba.sum(1), 1, atol=1e-5)
    # the probe fits its own training patches (near-separable 48-d features, 2 classes)
    lab = labels.labels >= 0
    assert (pred.labels[lab] == labels.labels[lab]).mean() > 0.8

    ras = pred.class_raster()
    g = ras.grid
    assert g.cell == P and ras.data.shape == g.shape
    assert ras.scale == pytest.approx((P * mpp, P * mpp))
    assert ras.translate == pytest.approx(((c[:, 1].min() + P / 2 - 0.5) * mpp,
                                           (c[:, 0].min() + P / 2 - 0.5) * mpp))
    # every patch's world centre falls in the raster cell holding its class
    centre_world = (c[:, ::-1] + P / 2 - 0.5) * mpp  # (y, x)
    cell = np.floor((centre_world - np.array(ras.translate)) / np.array(ras.scale) + 0.5)
    cell = cell.astype(int)
    assert (ras.data[cell[:, 0], cell[:, 1]] == pred.labels + 1).all()
    assert (ras.data > 0).sum() == store.n_patches
    # the raster covers exactly the slide region of the patches
    h, w = g.shape
    assert (c[:, 0].max() + P - c[:, 0].min()) == w * P and (c[:, 1].max() + P - c[:, 1].min()) == h * P
    prob = pred.probability_raster(0).data
    assert np.isnan(prob[ras.data == 0]).all() and np.isfinite(prob[ras.data > 0]).all()

    paths = write_outputs(pred, tmp_path / "out")
    out = read_geojson(paths["geojson"])
    assert {a.class_name for a in out} <= {"Tumor", "Stroma"}
    total = sum(a.area for a in out)
    assert total == pytest.approx(store.n_patches * P * P)
    n = sum(a.properties["measurements"]["Num patches"] for a in out)
    assert n == store.n_patches
    a0 = out[0]
    assert a0.properties["measurements"]["Area µm^2"] == pytest.approx(a0.area * mpp**2)
    rows = paths["csv"].read_text().splitlines()
    assert rows[0] == "x,y,class,class_name,prob_Tumor,prob_Stroma,uncertainty"
    assert len(rows) == store.n_patches + 1
    with h5py.File(paths["h5"]) as f:
        assert f["probabilities"].shape == (store.n_patches, 2)
        assert json.loads(f.attrs["class_names"]) == names
        np.testing.assert_array_equal(f["coords"][()], c)

    per = write_outputs(pred, tmp_path / "pp", per_patch=True, tables=())
    dets = read_geojson(per["geojson"])
    assert len(dets) == store.n_patches and dets[0].object_type == "detection"
    assert set(dets[0].properties["measurements"]) == {"prob_Tumor", "prob_Stroma", "uncertainty"}


def test_classifier_file_refused_on_another_recipe(store, tmp_path):
    res = train_probe(split_annotations(store), store, ["Tumor", "Stroma"], cv_folds=0)
    path = res.classifier.save(tmp_path / "c.npz")
    probe = load_classifier(path)
    probe.check_store(store)  # same recipe: fine
    assert probe.class_names == ["Tumor", "Stroma"] and probe.colours is None

    other = dict(store.recipe.to_dict(), model="gpfm", weights_sha256="abc")
    fake = SimpleNamespace(recipe=other, path=Path("other/slide.h5"), embed_dim=48)
    with pytest.raises(RecipeMismatchError, match="model: classifier has 'tiny-test'"):
        probe.check_store(fake, source=path)
    with pytest.raises(RecipeMismatchError, match="another recipe"):
        load_probe(path, expected_recipe=other)
    tiling = SimpleNamespace(recipe=dict(store.recipe.to_dict(), patch_size=224),
                             path=Path("x.h5"), embed_dim=48)
    with pytest.raises(RecipeMismatchError, match="patch_size"):
        check_recipe(probe, tiling)


def test_live_steps_yield_prediction_then_report(store):
    anns = split_annotations(store)
    steps = list(live_steps(ProbeRequest(anns[:1], store, ["Tumor", "Stroma"])))
    assert [s.kind for s in steps] == ["status"] and "two classes" in steps[0].message
    steps = list(live_steps(ProbeRequest(anns, store, ["Tumor", "Stroma"], cv_folds=3)))
    assert [s.kind for s in steps] == ["prediction", "report"]
    assert set(steps[0].rasters) == {"classes", "entropy", "p:Tumor", "p:Stroma"}
    assert steps[1].report.class_names == ["Tumor", "Stroma"]


def _cli(argv):
    from napari_gpfm.jobs._classify_cli import register

    parser = argparse.ArgumentParser(prog="napari-gpfm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_classifier_and_classify(store, sample_svs, tmp_path, capsys):
    geo = tmp_path / "qupath.geojson"
    write_geojson(geo, split_annotations(store))
    clf = tmp_path / "clf" / "tumour.npz"
    code = _cli(["train-classifier", "--annotations", str(geo), "--slide", str(sample_svs),
                 "--out", str(clf), "--model", TINY, "--allow-random-weights", "--folds", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "balanced accuracy" in out and clf.exists()
    # the features land in <store dir>/<tiling>/features_<model>/<slide>.h5 (default store
    # dir: the classifier's folder; tiling: the card's 112 px at 0.5 µm/px, no overlap)
    feature_file = (tmp_path / "clf" / "0.5mpp_112px_0px_overlap" / "features_tiny-test"
                    / "CMU-1-Small-Region.h5")  # fmt: skip
    assert feature_file.exists()
    assert sorted(p.relative_to(tmp_path / "clf").as_posix()
                  for p in (tmp_path / "clf").rglob("*.h5")) == [
        "0.5mpp_112px_0px_overlap/features_tiny-test/CMU-1-Small-Region.h5"]  # fmt: skip
    assert (tmp_path / "clf" / "tumour.classes.json").exists()
    probe = load_probe(clf)
    assert probe.class_names == ["Tumor", "Stroma"] and probe.colours.tolist()[0] == [200, 0, 0]

    res = tmp_path / "res"
    code = _cli(["classify", "--classifier", str(clf), str(sample_svs), "--out", str(res),
                 "--store-dir", str(tmp_path / "clf")])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in res.iterdir()} == {
        "CMU-1-Small-Region.geojson", "CMU-1-Small-Region_patches.csv",
        "CMU-1-Small-Region_patches.h5"}
    polys = read_geojson(res / "CMU-1-Small-Region.geojson")
    assert {a.class_name for a in polys} <= {"Tumor", "Stroma"}
    assert polys[0].color in {(200, 0, 0), (150, 200, 150)}

    # features of other encoder weights under the same model name: refused, naming the key
    bad = dict(probe.recipe, weights_sha256="0" * 64)
    probe.recipe = bad
    probe.save(tmp_path / "bad.npz")
    code = _cli(["classify", "--classifier", str(tmp_path / "bad.npz"), str(sample_svs),
                 "--out", str(tmp_path / "res2"), "--store-dir", str(tmp_path / "clf")])
    assert code == 1
    err = capsys.readouterr().err
    assert "weights_sha256" in err and "another model or recipe" in err


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_cli_classify_applies_both_classifier_kinds(store, sample_svs, tmp_path, capsys):
    """`train-classifier` writes a linear probe (.npz) and a PathoTune classifier
    (.safetensors); `classify` applies each (told apart by content: a renamed file too) with
    the same per-patch columns, and PathoTune needs no embeddings of the slide."""
    from napari_gpfm.pathotune import read_header

    geo = tmp_path / "qupath.geojson"
    write_geojson(geo, split_annotations(store))
    stores = str(store.path.parents[2])  # <store dir>/<tiling>/features_<model>/<slide>.h5
    common = ["--annotations", str(geo), "--slide", str(sample_svs), "--model", TINY,
              "--allow-random-weights", "--store-dir", stores]
    linear = tmp_path / "linear.npz"
    assert _cli(["train-classifier", "--method", "linear", *common, "--out", str(linear),
                 "--folds", "0"]) == 0
    assert _cli(["train-classifier", "--method", "pathotune", *common,
                 "--out", str(tmp_path / "pt"), "--epochs", "1", "--no-ttp", "--n-tvp", "2",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "linear probe written" in printed and "PathoTune classifier written" in printed
    header = read_header(tmp_path / "pt.safetensors")
    assert header["class_names"] == ["Tumor", "Stroma"] and header["backbone"]["name"] == TINY
    renamed = tmp_path / "tumour.classifier"  # the kind comes from the content, not the name
    renamed.write_bytes((tmp_path / "pt.safetensors").read_bytes())

    for clf, kind in ((linear, "linear"), (renamed, "pathotune")):  # one protocol, two kinds
        loaded = load_classifier(clf)
        assert isinstance(loaded, Classifier) and loaded.kind == kind
        assert {k: loaded.recipe[k] for k in ("model", "target_mpp", "patch_size")} == {
            "model": TINY, "target_mpp": 0.5, "patch_size": 112}

    columns = ["x", "y", "class", "class_name", "prob_Tumor", "prob_Stroma", "uncertainty"]
    for clf, kind in ((linear, "linear"), (renamed, "pathotune")):
        res = tmp_path / f"res-{kind}"
        code = _cli(["classify", "--classifier", str(clf), str(sample_svs), "--out", str(res),
                     "--store-dir", stores])
        assert code == 0, capsys.readouterr().err
        rows = _rows(res / "CMU-1-Small-Region_patches.csv")
        assert rows[0] == columns and len(rows) == store.n_patches + 1, kind
        xy = np.array([[int(r[0]), int(r[1])] for r in rows[1:]])
        np.testing.assert_array_equal(xy, store.coords)  # the store's grid, row for row
        assert {r[3] for r in rows[1:]} <= {"Tumor", "Stroma"}
        with h5py.File(res / "CMU-1-Small-Region_patches.h5") as f:
            assert json.loads(f.attrs["recipe"])["model"] == TINY
            assert json.loads(f.attrs["probability_columns"]) == columns[4:6]
        polys = read_geojson(res / "CMU-1-Small-Region.geojson")
        assert polys and {a.class_name for a in polys} <= {"Tumor", "Stroma"}

    # PathoTune on a slide with no feature store: its tiling laid over the tissue, no embedding
    res = tmp_path / "res-grid"
    assert _cli(["classify", "--classifier", str(renamed), str(sample_svs), "--out",
                 str(res), "--per-patch"]) == 0, capsys.readouterr().err
    rows = _rows(res / "CMU-1-Small-Region_patches.csv")
    assert rows[0] == columns and len(rows) == store.n_patches + 1
    assert not list(res.rglob("*.h5.partial")) and not (res / "0.5mpp_112px_0px_overlap").exists()
    dets = read_geojson(res / "CMU-1-Small-Region.geojson")
    assert set(dets[0].properties["measurements"]) == set(columns[4:])


def test_classify_refuses_a_file_of_no_classifier_kind(sample_svs, tmp_path, capsys):
    """One `error:` line naming the file and what is read, exit code 2, for a file that is
    neither kind, an empty file and a damaged file of each kind."""
    from napari_gpfm.cli import main

    good = tmp_path / "good.npz"
    fit_probe(np.eye(4, dtype=np.float32), [0, 1, 0, 1], ["a", "b"]).save(good)
    files = {"notes.npz": b"just text, not a classifier", "empty.safetensors": b"",
             "cut.npz": good.read_bytes()[:40], "cut.safetensors": b"\x10" + b"\0" * 7 + b"{"}
    expected = {"notes.npz": "not a classifier file", "empty.safetensors": "an empty file",
                "cut.npz": "not a readable probe file",
                "cut.safetensors": "not a readable safetensors file"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        code = main(["classify", "--classifier", str(tmp_path / name), str(sample_svs),
                     "--out", str(tmp_path / "res")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {tmp_path / name}: "), (name, err)
        assert expected[name] in err and len(err.strip().splitlines()) == 1, (name, err)
    assert not (tmp_path / "res").exists()
