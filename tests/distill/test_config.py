"""Config merging (defaults <- file <- CLI), validation, lr scaling and saving."""

from __future__ import annotations

import math

import pytest
import yaml

from napari_gpfm.distill.config import (
    ConfigError,
    config_hash,
    load_config,
    load_defaults,
    parse_dotlist,
    save_config,
    scaled_lr,
)

TILES = "data.tiles=[/some/tiles]"


def test_cli_overrides_file_overrides_defaults(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("train: {steps: 50, batch_size: 8}\nstudent: {kwargs: {depth: 2}}\n")
    cfg = load_config(experiment, ["train.steps=7", TILES, "crops.global_scale=[0.4, 1.0]"])
    assert cfg["train"]["steps"] == 7 and cfg["train"]["batch_size"] == 8
    assert cfg["student"]["kwargs"] == {"init_values": 1e-5, "depth": 2}  # open section
    assert cfg["crops"]["global_scale"] == [0.4, 1.0]
    assert cfg["dino"]["n_prototypes"] == load_defaults()["dino"]["n_prototypes"]


def test_bundled_experiment_files_hold_only_known_keys():
    for name in ("tiny_cpu", "gpfm_vitl14", "vits14_expert_uni"):
        load_config(name, [TILES])


def test_unknown_keys_and_bad_values_are_refused():
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config(None, ["train.stepz=3", TILES])
    with pytest.raises(ConfigError, match="data.tiles"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config(None, [TILES, "ibot.mask_ratio_min_max=[0.1, 0.8]"])
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(None, [TILES, "experts.models.x={cls_weight: 1.0}"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_dotlist(["train.steps"])


def test_dotlist_values_are_yaml():
    parsed = parse_dotlist(["a.b=3", "a.c=null", "d=[1, 2]"])
    assert parsed == {"a": {"b": 3, "c": None}, "d": [1, 2]}


def test_sqrt_lr_scaling_and_stable_hash(tmp_path):
    cfg = load_config(None, [TILES])
    assert math.isclose(scaled_lr(cfg, 256), cfg["optim"]["lr"] * 0.5)  # sqrt(256/1024)
    path = save_config(cfg, tmp_path)
    assert yaml.safe_load(path.read_text()) == cfg
    assert config_hash(cfg) == config_hash(yaml.safe_load(path.read_text()))
