"""``train-classifier --method pathotune`` and ``pathotune`` resolve ``--device auto`` (the
default) with the one device resolver, and refuse a device this machine lacks in one line."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from napari_gpfm.annotations.geojson import Annotation, write_geojson
from level0_shapes import rect
from tiny_models import embed_sample, tiny_card

TINY = "tiny-device"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    (d / f"{TINY}.yaml").write_text(tiny_card(TINY, 112))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield d


@pytest.fixture(scope="module")
def store(models_dir, sample_svs, tmp_path_factory):
    """A real feature store of the sample slide (tiny random ViT, 112 px at 0.5 µm/px)."""
    return embed_sample(sample_svs, TINY, tmp_path_factory.mktemp("features"))


def _annotations(store, path):
    """Left third of the tissue = Tumor, right third = Stroma."""
    c, P = store.coords, store.patch_size_level0
    xs = np.sort(np.unique(c[:, 0]))
    lo, hi = xs[len(xs) // 3], xs[2 * len(xs) // 3]
    y0, y1 = c[:, 1].min(), c[:, 1].max() + P
    write_geojson(path, [
        Annotation([[rect(c[:, 0].min(), y0, lo, y1)]], class_name="Tumor", color=(200, 0, 0)),
        Annotation([[rect(hi, y0, c[:, 0].max() + P, y1)]], class_name="Stroma",
                   color=(150, 200, 150)),
    ])
    return path


def _run(argv):
    """Parse and run like ``napari-gpfm`` (its error rule: one ``error:`` line, exit 2)."""
    from napari_gpfm.jobs import _classify_cli as _cli
    from napari_gpfm.pathotune import _cli as pathotune_cli
    from napari_gpfm.cli import run

    parser = argparse.ArgumentParser(prog="napari-gpfm")
    sub = parser.add_subparsers(dest="command", required=True)
    _cli.register(sub)
    pathotune_cli.register(sub)
    return run(parser.parse_args(argv))


def _train_argv(store, sample_svs, tmp_path):
    geo = _annotations(store, tmp_path / "qupath.geojson")
    return ["train-classifier", "--method", "pathotune", "--annotations", str(geo),
            "--slide", str(sample_svs), "--out", str(tmp_path / "pt" / "tumour"), "--model", TINY,
            "--allow-random-weights", "--store-dir", str(store.path.parent.parent),
            "--epochs", "1", "--no-ttp", "--n-tvp", "2"]


def test_train_classifier_pathotune_without_device_runs(store, sample_svs, tmp_path, capsys):
    import torch

    from napari_gpfm.pathotune import read_header

    code = _run(_train_argv(store, sample_svs, tmp_path))  # no --device: "auto"
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    written = tmp_path / "pt" / "tumour.safetensors"
    assert written.exists() and "PathoTune classifier written" in captured.out
    header = read_header(written)
    assert header["class_names"] == ["Tumor", "Stroma"] and header["backbone"]["name"] == TINY
    assert "device string" not in captured.err
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert header["info"]["training"]["device"].startswith(expected)  # resolved "auto"


def test_a_device_this_machine_lacks_is_one_error_line(store, sample_svs, tmp_path, capsys,
                                                      monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = _run([*_train_argv(store, sample_svs, tmp_path), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --device cuda:") and "CUDA" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "pt").exists()
    code = _run([*_train_argv(store, sample_svs, tmp_path), "--device", "gpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --device gpu:")
