"""student.init: the student (and the teacher, its copy) start from a GPFM-layout checkpoint, a
registry model, or a flat file; mismatches are refused naming the file (issue #11)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from napari_gpfm.distill.config import ConfigError, init_overrides, load_config, merge, nest_dotted
from napari_gpfm.distill.student_init import StudentInitError
from napari_gpfm.distill.train import TrainingRun

ARCH = "vit_small_patch14_dinov2"
KWARGS = {"embed_dim": 48, "depth": 2, "num_heads": 2}


def _vit(seed: int, img_size: int = 56, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=img_size,
                             init_values=0.5, **{**KWARGS, **over})


def _gpfm_release(vit: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """GPFM's GitHub release layout: {'teacher': {'backbone.blocks.<chunk>.<i>...', heads}}."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    teacher = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            key = f"blocks.{i}.{i}.{rest}"  # DINOv2 block chunks: chunk c holds block c at index c
        teacher[f"backbone.{key}"] = value
    teacher["backbone.mask_token"] = torch.zeros(1, 48)
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, 48)
    torch.save({"teacher": teacher}, path)
    return sd


def _first_step_weights(cfg) -> tuple[TrainingRun, dict, dict]:
    """Build the run and take one step, recording student and teacher backbones as the first
    step's forward pass sees them."""
    run = TrainingRun(cfg)
    seen: dict[str, dict] = {}
    forward = run.meta.compute_losses

    def spy(*args, **kwargs):
        if not seen:
            for part in ("student", "teacher"):
                vit = getattr(run.meta, part)["backbone"].vit
                seen[part] = {k: v.detach().clone() for k, v in vit.state_dict().items()}
        return forward(*args, **kwargs)

    run.meta.compute_losses = spy
    from napari_gpfm.distill.data import build_loader

    batches = iter(build_loader(cfg, run.source, run.meta.patch_size, run.layout, 0))
    run.train_step(0, batches)
    return run, seen["student"], seen["teacher"]


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad


def test_gpfm_release_checkpoint_starts_student_and_teacher(tiny_config, tmp_path):
    path = tmp_path / "GPFM.pth"
    expected = _gpfm_release(_vit(seed=3), path)
    cfg = tiny_config(**{"student.init": str(path), "train.steps": 1,
                         "schedules.warmup_steps": 0})
    run, student, teacher = _first_step_weights(cfg)
    _equal(student, expected)
    _equal(teacher, expected)
    report = run.meta.init_report
    assert report.layout == "gpfm" and report.loaded == len(expected) and not report.missing
    assert any("student.init: student and teacher start from" in n and str(path) in n
               for n in run.notes)
    # the step trained from there: the student moved away from the checkpoint
    moved = run.meta.student["backbone"].vit.state_dict()["blocks.1.mlp.fc2.weight"]
    assert not torch.equal(moved, expected["blocks.1.mlp.fc2.weight"])


def test_registry_model_starts_student_and_teacher(tiny_config, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    vit = _vit(seed=5)
    expected = {k: v.clone() for k, v in vit.state_dict().items()}
    save_file(expected, models / "tiny-init.safetensors")
    card = {
        "name": "tiny-init", "display_name": "tiny init test", "is_gpfm": False,
        "architecture": {"timm_name": ARCH, "kwargs": {"img_size": 56, "num_classes": 0,
                                                       "init_values": 0.5, **KWARGS}},
        "checkpoint_layout": "timm",
        "input": {"size": 56, "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                  "std": [0.229, 0.224, 0.225]},
        "embed_dim": 48,
        "weights": {"file": "tiny-init.safetensors", "env": None, "default_path": None,
                    "hf_hub": None, "url": None, "sha256": None},
        "license": "Apache-2.0", "gated": False,
        "recommended_tiles": {"target_mpp": 0.5, "patch_size": 56}, "provenance": {},
    }
    (models / "tiny-init.yaml").write_text(yaml.safe_dump(card))
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(models))
    over = init_overrides("tiny-init")
    assert over["student.arch"] == ARCH and over["student.layerscale_init"] == 0.5
    assert over["student.kwargs"] == KWARGS
    cfg = tiny_config(**over, **{"train.steps": 1})
    run, student, teacher = _first_step_weights(cfg)
    _equal(student, expected)
    _equal(teacher, expected)
    assert run.meta.init_report.kind == "registry model"
    # the config must name the card's architecture
    with pytest.raises(ConfigError, match="student.arch = 'vit_large_patch14_dinov2'.*tiny-init"):
        load_config(None, ["student.init=tiny-init", "data.tiles=[/x]"])


def test_wrong_shapes_missing_keys_and_unknown_names_are_refused(tiny_config, tmp_path):
    wide = tmp_path / "wide.safetensors"
    save_file(dict(_vit(seed=1, embed_dim=96, num_heads=3).state_dict()), wide)
    with pytest.raises(StudentInitError, match=r"wide\.safetensors.*wrong shapes"):
        TrainingRun(tiny_config(**{"student.init": str(wide)}))

    partial = tmp_path / "partial.safetensors"
    sd = dict(_vit(seed=1).state_dict())
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["head.weight"] = torch.zeros(2, 48)
    save_file(sd, partial)
    with pytest.raises(StudentInitError, match=r"partial\.safetensors.*missing keys.*"
                                               r"blocks\.1\.mlp\.fc2\.bias.*unexpected.*head"):
        TrainingRun(tiny_config(**{"student.init": str(partial)}))
    run = TrainingRun(tiny_config(**{"student.init": str(partial), "student.init_strict": False}))
    note = next(n for n in run.notes if n.startswith("student.init"))
    assert "1 missing" in note and "blocks.1.mlp.fc2.bias" in note and "head.weight" in note

    with pytest.raises(ConfigError, match="student.init = 'no-such-model'.*registry model"):
        TrainingRun(tiny_config(**{"student.init": "no-such-model"}))


def test_position_embedding_of_another_grid_is_resampled(tiny_config, tmp_path):
    path = tmp_path / "big.safetensors"
    save_file(dict(_vit(seed=2, img_size=112).state_dict()), path)  # 8x8 grid vs the student's 4x4
    run = TrainingRun(tiny_config(**{"student.init": str(path)}))
    assert "resampled" in run.meta.init_report.message()
    assert run.meta.student["backbone"].vit.pos_embed.shape == (1, 17, 48)


def test_cli_init_sets_the_registry_architecture_before_the_overrides():
    from napari_gpfm.distill._cli import config_overrides
    from napari_gpfm.distill.config import parse_dotlist

    assert config_overrides(["train.steps=3"], None) == ["train.steps=3"]
    parsed = parse_dotlist(config_overrides(["student.init_strict=false"], "gpfm"))
    assert parsed["student"] == {"init": "gpfm", "arch": "vit_large_patch14_dinov2",
                                 "kwargs": {}, "layerscale_init": 1e-5, "init_strict": False}


def test_continue_gpfm_config_starts_from_gpfm_and_keeps_it_as_expert(tmp_path, monkeypatch):
    from napari_gpfm.encoders import WeightsNotFoundError

    monkeypatch.setenv("GPFM_WEIGHTS", str(tmp_path / "absent.pth"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/napari-gpfm/weights/GPFM.pth
    cfg = load_config("continue_gpfm", [f"data.tiles=[{tmp_path}]"])
    assert cfg["student"]["init"] == "gpfm" and cfg["student"]["arch"] == init_overrides(
        "gpfm")["student.arch"]
    assert cfg["experts"]["models"]["gpfm"]["encoder"] == "gpfm"
    assert cfg["supervised"]["weight"] > 0 and not cfg["supervised"]["require_labels"]
    with pytest.raises(WeightsNotFoundError, match="gpfm"):
        TrainingRun(merge(cfg, nest_dotted({"output.dir": str(tmp_path / "run")})))


def test_slide_annotations_label_patches_for_the_supervised_term(tiny_config, tmp_path):
    import json
    import shutil

    repo = Path(__file__).resolve().parents[2]
    sample = repo / "sample_data" / "CMU-1-Small-Region.svs"
    if not sample.is_file():
        pytest.skip(f"sample slide {sample} not found")
    slide = tmp_path / sample.name
    shutil.copy(sample, slide)
    from napari_gpfm.slide import open_slide

    w, h = open_slide(slide).level_dimensions[0]
    def square(x0, x1, name):
        ring = [[x0, 0], [x1, 0], [x1, h], [x0, h], [x0, 0]]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": name}}}
    (tmp_path / "CMU-1-Small-Region.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [square(0, w // 2, "Left"),
                                                   square(w // 2, w, "Right")]}))
    from napari_gpfm.distill.sources import build_source

    cfg = tiny_config(**{"data.tiles": [], "data.slides": [str(slide)]})
    source = build_source(cfg)
    assert source.classes == ["Left", "Right"]
    labels = [source.label(i) for i in range(len(source))]
    assert set(labels) <= {-1, 0, 1} and labels.count(0) and labels.count(1)
    assert source.describe()["n_labelled"] == sum(v >= 0 for v in labels)
    cfg = tiny_config(**{"data.tiles": [], "data.slides": [str(slide)],
                         "data.annotations": False})
    assert build_source(cfg).classes == []


def test_supervised_term_without_labels_is_switched_off_when_allowed(tiny_config, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    from napari_gpfm.distill.sources import build_source

    src = build_source(tiny_config(**{"train.steps": 1}))
    for i in range(8):  # tiles without class folders
        from PIL import Image

        Image.fromarray(src.read(i)).save(flat / f"t{i}.png")
    cfg = tiny_config(**{"data.tiles": [str(flat)], "supervised.weight": 1.0})
    with pytest.raises(ConfigError, match="supervised.weight > 0 needs >= 2 labelled classes"):
        TrainingRun(cfg)
    run = TrainingRun(tiny_config(**{"data.tiles": [str(flat)], "supervised.weight": 1.0,
                                     "supervised.require_labels": False}))
    assert "supervised_head" not in run.meta.student
    assert any("supervised term switched off" in n for n in run.notes)


def test_cli_init_reports_a_misfit_file_as_one_error_line(tiny_config, tmp_path, capsys):
    import argparse

    from napari_gpfm.distill import _cli

    wide = tmp_path / "wide.safetensors"
    save_file(dict(_vit(seed=1, embed_dim=96, num_heads=3).state_dict()), wide)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    parser = argparse.ArgumentParser()
    _cli.register(parser.add_subparsers())
    args = parser.parse_args(["distill", "--config", str(config), "--init", str(wide)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(wide) in err and "wrong shapes" in err
    args = parser.parse_args(["distill", "--config", str(config), "--init", "nonesuch"])
    assert args.func(args) == 2
    assert "student.init = 'nonesuch'" in capsys.readouterr().err
