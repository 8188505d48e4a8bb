"""The PathoTune dock: trains on a Shapes layer's classes in a worker, paints the slide, cancels."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import yaml

TINY = {
    "name": "pt-widget-tiny", "display_name": "tiny", "is_gpfm": False,
    "architecture": {"timm_name": "vit_small_patch14_dinov2",
                     "kwargs": {"img_size": 56, "embed_dim": 48, "depth": 2, "num_heads": 2,
                                "num_classes": 0, "init_values": 1.0}},
    "checkpoint_layout": "timm",
    "input": {"size": 56, "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225]},
    "embed_dim": 48,
    "weights": {"file": None, "env": None, "default_path": None, "hf_hub": None, "url": None,
                "sha256": None},
    "license": "Apache-2.0", "gated": False,
    "recommended_tiles": {"target_mpp": 0.5, "patch_size": 224}, "provenance": {},
}


class FakeText:
    name, dim = "fake-text", 384

    def encode(self, sentences):
        rows = [np.random.default_rng(int(hashlib.sha256(s.encode()).hexdigest()[:8], 16))
                .standard_normal(384) for s in sentences]
        return np.stack(rows).astype(np.float32)


@pytest.fixture
def dock(make_napari_viewer, sample_svs, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention on a shared CPU
    request_cleanup = lambda: torch.set_num_threads(threads)  # noqa: E731
    (tmp_path / "pt-widget-tiny.yaml").write_text(yaml.safe_dump(TINY))
    from napari_gpfm._qt.pathotune_widget import PathoTuneWidget

    viewer = make_napari_viewer()
    (slide_layer,) = viewer.open(str(sample_svs), plugin="napari-gpfm")
    mpp = float(slide_layer.scale[-1])
    # two classes: upper and lower part of the sample (level-0 px, y then x)
    top = np.array([[0, 0], [0, 2220], [1300, 2220], [1300, 0]], float)
    bottom = np.array([[1500, 0], [1500, 2220], [2967, 2220], [2967, 0]], float)
    viewer.add_shapes([top, bottom], shape_type="polygon", scale=(mpp, mpp), name="annotations",
                      features={"class": np.array(["upper", "lower"], dtype=object)})
    widget = PathoTuneWidget(viewer)
    widget.model_combo.setCurrentText("pt-widget-tiny")
    widget.random_check.setChecked(True)
    widget.text_encoder = FakeText()
    widget.n_spin.setValue(2)
    yield viewer, widget
    request_cleanup()


def test_trains_in_a_worker_and_paints_the_slide(dock, qtbot, tmp_path):
    viewer, widget = dock
    assert widget.slide_combo.currentText() == "CMU-1-Small-Region"
    assert widget.shapes_combo.currentText() == "annotations"
    widget.epochs_spin.setValue(2)
    worker = widget.train()
    assert worker is not None and not widget.train_button.isEnabled()
    # the worker is running already: wait on the widget's state rather than a late-connected signal
    qtbot.waitUntil(lambda: widget.worker is None, timeout=90_000)
    assert widget.last is not None and widget.last.prediction is not None
    assert widget.classifier is not None and widget.classifier.class_names == ["upper", "lower"]
    assert widget.last.n_labelled >= 4 and "validation balanced accuracy" in widget.scores.text()
    assert "linear probe on the same split" in widget.scores.text()
    classes = viewer.layers["CMU-1-Small-Region PathoTune classes"]
    assert set(np.unique(classes.data)) <= {0, 1, 2} and classes.data.max() >= 1
    assert "CMU-1-Small-Region PathoTune P(upper)" in viewer.layers
    assert "CMU-1-Small-Region PathoTune uncertainty" in viewer.layers
    # predicted patches sit on the slide: the class map covers the slide's extent in µm
    slide_extent = viewer.layers["CMU-1-Small-Region"].extent.world[1]
    map_extent = classes.extent.world[1]
    assert np.all(map_extent <= slide_extent + 1e-6 + classes.scale[-1])
    path = widget.save(tmp_path / "clf")
    assert path.exists() and widget.load(path) is not None


def test_cancel_stops_training(dock, qtbot):
    viewer, widget = dock
    widget.epochs_spin.setValue(500)
    widget.val_spin.setValue(0.0)
    steps = []
    worker = widget.train()
    worker.yielded.connect(lambda r: steps.append(r) if getattr(r, "status", "") == "step"
                           else None)
    qtbot.waitUntil(lambda: len(steps) >= 1, timeout=90_000)
    t0 = time.perf_counter()
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert time.perf_counter() - t0 < 20
    assert len(steps) <= 3  # stopped within a step of the request (signals may be in flight)
    assert widget.classifier is None and widget.status.text() == "cancelled"
    assert "CMU-1-Small-Region PathoTune classes" not in viewer.layers
    assert widget.train_button.isEnabled() and not widget.cancel_button.isEnabled()
