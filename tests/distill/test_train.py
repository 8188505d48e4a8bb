"""End-to-end runs on a tiny ViT/14 over the 32 real H&E tiles (CPU)."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from napari_gpfm.distill.checkpoint import latest_checkpoint
from napari_gpfm.distill.meta_arch import DistillMetaArch
from napari_gpfm.distill.train import NonFiniteLossError, run_distillation

REPO = Path(__file__).resolve().parents[2]
FIRST_LAST = 5


def _losses(cfg, **kwargs):
    records = []
    result = run_distillation(cfg, on_log=records.append, **kwargs)
    return result, records


def test_twenty_steps_lower_the_loss_and_export_a_loadable_student(tiny_config, monkeypatch):
    result, records = _losses(tiny_config(**{"train.steps": 20}))
    totals = [r.losses["total"] for r in records]
    assert set(records[0].losses) == {"total", "dino", "ibot", "koleo"}
    first, last = sum(totals[:FIRST_LAST]) / FIRST_LAST, sum(totals[-FIRST_LAST:]) / FIRST_LAST
    assert last < first, totals
    assert result.finished and result.card_path.is_file() and result.weights_path.is_file()
    card = yaml.safe_load(result.card_path.read_text())
    assert card["checkpoint_layout"] == "timm" and card["provenance"]["steps"] == 20
    assert card["weights"]["file"] == result.weights_path.name
    # tiled as it learned: data.patch_size px at data.target_mpp, resized to the input size
    cfg = tiny_config(**{"train.steps": 20})
    assert card["recommended_tiles"] == {"target_mpp": cfg["data"]["target_mpp"],
                                         "patch_size": cfg["data"]["patch_size"]}
    assert card["input"]["size"] == cfg["crops"]["global_size"]
    if importlib.util.find_spec("napari_gpfm.encoders.encoder") is None:
        pytest.skip("napari_gpfm.encoders.load_encoder is not available")
    from napari_gpfm.encoders import load_encoder

    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(result.card_path.parent))
    encoder = load_encoder(card["name"])
    exported = load_file(result.weights_path)
    assert all(torch.equal(v, exported[k]) for k, v in encoder.model.state_dict().items())
    assert encoder.embed(torch.zeros(2, 3, 56, 56)).shape == (2, 48)


def test_resume_after_ctrl_c_equals_the_uninterrupted_run(tiny_config):
    straight, _ = _losses(tiny_config("straight"))

    def interrupt_at_step_2(record):
        if record.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the loop saves and stops after this step

    cfg = tiny_config("resumed")
    stopped = run_distillation(cfg, on_log=interrupt_at_step_2)
    assert not stopped.finished and stopped.next_step == 3 and stopped.card_path is None
    assert latest_checkpoint(cfg["output"]["dir"]).name == "step_00000003"
    resumed = run_distillation(cfg)
    assert resumed.finished
    a = load_file(straight.checkpoint / "weights.safetensors")
    b = load_file(resumed.checkpoint / "weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    with open(Path(cfg["output"]["dir"]) / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(6))


def test_expert_with_a_different_patch_grid_and_dino_switched_off(tiny_config):
    expert = {
        "timm": {"name": "vit_tiny_patch16_224",
                 "kwargs": {"img_size": 48, "embed_dim": 32, "depth": 1, "num_heads": 2}},
        "cls_weight": 1.0, "patch_weight": 0.5,
    }  # 48 px / 16 = 3×3 expert grid vs the student's 56 / 14 = 4×4
    cfg = tiny_config(**{"train.steps": 3, "dino.weight": 0.0, "experts.models.tiny": expert})
    result, records = _losses(cfg)
    assert result.finished
    expected = {"total", "ibot", "koleo", "expert_cls/tiny", "expert_patch/tiny"}
    assert set(records[-1].losses) == expected
    assert all(torch.isfinite(torch.tensor(list(r.losses.values()))).all() for r in records)


def test_supervised_term_uses_tile_folder_classes(tiny_config):
    cfg = tiny_config(**{"train.steps": 1, "supervised.weight": 1.0, "koleo.weight": 0.0})
    _, records = _losses(cfg)
    assert set(records[0].losses) == {"total", "dino", "ibot", "supervised"}


def test_a_non_finite_loss_stops_the_run(tiny_config, monkeypatch):
    original = DistillMetaArch.compute_losses

    def poisoned(self, *args, **kwargs):
        total, terms = original(self, *args, **kwargs)
        return total * float("nan"), terms

    monkeypatch.setattr(DistillMetaArch, "compute_losses", poisoned)
    cfg = tiny_config(**{"train.steps": 2})
    with pytest.raises(NonFiniteLossError, match="step 0"):
        run_distillation(cfg)
    assert latest_checkpoint(cfg["output"]["dir"]) is None


def test_two_process_gloo_run_under_torchrun(tiny_config, tmp_path):
    cfg = tiny_config("ddp", **{"train.steps": 3, "train.batch_size": 2})
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "napari_gpfm.distill", "--config", str(config_file)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported student card" in done.stdout
    with open(Path(cfg["output"]["dir"]) / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]


def test_slide_patch_source_reads_tissue_patches(tiny_config):
    if importlib.util.find_spec("napari_gpfm.slide") is None or importlib.util.find_spec(
        "napari_gpfm.tiles"
    ) is None:
        pytest.skip("napari_gpfm.slide / napari_gpfm.tiles are not available")
    slide = REPO / "sample_data" / "CMU-1-Small-Region.svs"
    if not slide.is_file():
        pytest.skip(f"sample slide {slide} not found")
    from napari_gpfm.distill.sources import ConcatSource, SlidePatchSource, build_source

    cfg = tiny_config(**{"data.slides": [str(slide.parent)]})
    source = build_source(cfg)
    assert isinstance(source, ConcatSource)
    slides = source.sources[1]
    assert isinstance(slides, SlidePatchSource) and len(slides) > 0
    patch = source.read(len(source) - 1)
    assert patch.shape == (224, 224, 3) and patch.dtype.name == "uint8"
    assert source.label(len(source) - 1) == -1 and source.label(0) >= 0


def test_an_optional_expert_without_weights_is_left_out_and_the_run_says_so(
        tiny_config, tmp_path, monkeypatch):
    from tiny_models import write_tiny_card

    write_tiny_card(tmp_path / "cards", "weightless")  # a registry model without weights
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(tmp_path / "cards"))
    expert = {"encoder": "weightless", "cls_weight": 1.0, "optional": True}
    result, records = _losses(tiny_config(**{"train.steps": 1, "experts.models.uni": expert}))
    assert result.finished and set(records[0].losses) == {"total", "dino", "ibot", "koleo"}
    assert result.provenance["experts"] == []
    note = "experts.models.uni is optional and its weights are missing: training without expert"
    assert any(n.startswith(note) for n in result.notes), result.notes
    assert result.provenance["notes"] == result.notes
