"""A project keeps the session's classifiers of either kind: the linear probe (``.npz``) and
PathoTune (``.safetensors``, its backbone rebuilt from the model card on reopening), read back
through the one loader (``jobs.classifiers.load_classifier``). Headless: napari's ViewerModel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from napari.components import ViewerModel
from tiny_models import FakeText

from napari_gpfm import pathotune as pt
from napari_gpfm.analyses.probe import LinearProbe, fit_probe
from napari_gpfm.layers import project
from napari_gpfm.layers.session import ViewerSession

ARCH = {"timm_name": "vit_small_patch14_dinov2",
        "kwargs": {"img_size": 56, "embed_dim": 48, "depth": 2, "num_heads": 2, "num_classes": 0,
                   "init_values": 1.0}}  # fmt: skip


@pytest.fixture
def tiny_backbone(tmp_path, monkeypatch):
    card = {
        "name": "pt-proj", "display_name": "pt-proj", "is_gpfm": False, "architecture": ARCH,
        "checkpoint_layout": "timm",
        "input": {"size": 56, "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                  "std": [0.229, 0.224, 0.225]},
        "embed_dim": 48,
        "weights": {"file": None, "env": None, "default_path": None, "hf_hub": None, "url": None,
                    "sha256": None},
        "license": "Apache-2.0", "gated": False,
        "recommended_tiles": {"target_mpp": 0.5, "patch_size": 224}, "provenance": {},
    }  # fmt: skip
    models = tmp_path / "models"
    models.mkdir()
    (models / "pt-proj.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(models))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from napari_gpfm.encoders import load_encoder

    return load_encoder("pt-proj", allow_random=True, seed=0)


def _probe(classes) -> LinearProbe:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 48)).astype(np.float32)
    y = np.arange(40) % len(classes)
    x[np.arange(40), y] += 3.0
    return fit_probe(x, y, list(classes), recipe={"model": "pt-proj"})


def test_probe_and_pathotune_classifiers_come_back_with_the_project(tiny_backbone, tmp_path):
    classes = ["Tumour", "Stroma"]
    clf = pt.build_classifier(tiny_backbone, classes, pt.PromptConfig(n_tvp=3, ttp=True),
                              text_encoder=FakeText(), colours=np.array([[200, 0, 0], [0, 0, 200]]),
                              seed=1)  # fmt: skip
    with torch.no_grad():  # values a fresh classifier would not have
        clf.model.head.weight.normal_(0, 0.5)
    probe = _probe(classes)
    session = ViewerSession(ViewerModel())
    session.set_out_dir(tmp_path / "study")
    session.set_classifier("pathotune", clf)
    session.set_classifier("probe", probe)
    path = project.save_project(session)
    saved = json.loads(path.read_text())["classifiers"]
    assert saved == {"pathotune": "classifiers/pathotune.safetensors",
                     "probe": "classifiers/probe.npz"}

    again = ViewerSession(ViewerModel())
    report = project.restore_project(again, tmp_path / "study")
    assert not report.problems, report.problems
    assert sorted(report.classifiers) == ["pathotune", "probe"]
    back = again.classifiers["pathotune"]
    assert back.kind == "pathotune" and back.class_names == classes
    tiles = np.random.default_rng(2).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    assert np.allclose(pt.predict_arrays(back, tiles), pt.predict_arrays(clf, tiles), atol=1e-6)
    p2 = again.classifiers["probe"]
    assert p2.kind == "linear" and np.allclose(p2.weight, probe.weight)
