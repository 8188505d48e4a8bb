"""Config merging (defaults <- file <- CLI), validation (every key's type and range, every
bundled experiment), experts without weights, lr scaling and saving."""

from __future__ import annotations

import math
import pathlib

import pytest
import yaml
from tiny_models import write_tiny_card

from napari_gpfm.distill.config import (
    EXPERIMENTS_DIR,
    SCHEMA,
    ConfigError,
    config_hash,
    load_config,
    load_defaults,
    merge,
    nest_dotted,
    parse_dotlist,
    save_config,
    scaled_lr,
    schema_paths,
    validate,
)

TILES = "data.tiles=[/some/tiles]"


def test_cli_overrides_file_overrides_defaults(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("train: {steps: 50, batch_size: 8}\nstudent: {kwargs: {depth: 2}}\n")
    cfg = load_config(experiment, ["train.steps=7", TILES, "crops.global_scale=[0.4, 1.0]"])
    assert cfg["train"]["steps"] == 7 and cfg["train"]["batch_size"] == 8
    assert cfg["student"]["kwargs"] == {"depth": 2}  # open section (LayerScale: layerscale_init)
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


# -- validation: one ConfigError naming the key, the value and what is allowed -------------------

BAD_VALUES = [  # (override, key, value as shown, words of what is allowed)
    ("train.steps=abc", "train.steps", "'abc'", "an integer >= 1"),
    ("train.batch_size=0", "train.batch_size", "0", "an integer >= 1"),
    ("optim.lr=fast", "optim.lr", "'fast'", "a number > 0"),
    ("crops.global_size=50", "crops.global_size", "50",
     "a multiple of the student's patch size 14 (vit_small_patch14_dinov2), e.g. 42 or 56"),
    ("crops.local_size=7", "crops.local_size", "7", "a multiple of the student's patch size 14"),
    ("student.arch=vit_nonexistent", "student.arch", "'vit_nonexistent'",
     "a timm ViT with a CLS token"),
    ("student.arch=resnet18", "student.arch", "'resnet18'", "a timm ViT with a CLS token"),
    ("student.kwargs.embed_dim=50", "student.kwargs", "'embed_dim': 50",
     "keyword arguments that build vit_small_patch14_dinov2"),
    ("train.device=cuda", "train.device", "'cuda'", "auto or cpu"),
    ("train.device=gpu", "train.device", "'gpu'", "auto or cpu"),
    ("train.precision=fp8", "train.precision", "'fp8'", "one of bf16, fp16, fp32"),
    ("train=5", "train", "5", "a mapping of the train.* keys"),
    ("ibot.mask_ratio_min_max=[0.1, 0.8]", "ibot.mask_ratio_min_max", "[0.1, 0.8]",
     "[min, max] with min <= max, both in [0, 0.5]"),
    ("data.tiles=/some/tiles", "data.tiles", "'/some/tiles'", "a list of paths"),
    ("train.resume=''", "train.resume", "''", "true, false or the path of a checkpoint"),
    ("experts.models.x={encoder: uni, cls_weight: fast}", "experts.models.x.cls_weight",
     "'fast'", "a number >= 0"),
    ("experts.models.x={encoder: unii, cls_weight: 1}", "experts.models.x.encoder", "'unii'",
     "a model of the encoder registry"),
    ("experts.models.x={timm: {name: resnet18}, cls_weight: 1}", "experts.models.x.timm.name",
     "'resnet18'", "a timm ViT"),
]


@pytest.mark.parametrize("override, key, shown, allowed", BAD_VALUES,
                         ids=[case[0] for case in BAD_VALUES])
def test_a_bad_value_is_one_config_error_naming_key_value_and_allowed(
        override, key, shown, allowed, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "cuda" absent everywhere
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", [TILES, override])
    message = str(info.value)
    assert message.startswith(f"{key} = "), message
    assert shown in message and f"expected {allowed}" in message, message
    assert info.value.key == key


@pytest.mark.parametrize("override, suggestion", [
    ("train.stepz=3", "did you mean 'train.steps'?"),
    ("trian.steps=3", "did you mean 'train'?"),
    ("crops.jitter.brightnes=0.1", "did you mean 'crops.jitter.brightness'?"),
    ("experts.models.x={encoder: uni, cls_wieght: 1}",
     "did you mean 'experts.models.x.cls_weight'?"),
])
def test_unknown_keys_are_refused_with_the_closest_known_key(override, suggestion):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_config(None, [TILES, override])
    assert suggestion in str(info.value)


def test_an_expert_without_loss_weights_is_refused_not_dropped():
    with pytest.raises(ConfigError, match="experts.models.x gives neither cls_weight nor "
                                          "patch_weight"):
        load_config(None, [TILES, "experts.models.x={encoder: uni}"])


@pytest.mark.parametrize("content, words", [
    (bytes(range(256)) * 8, "not a YAML text file"),
    (b"\x00\x01train: {steps: 3}\n", "not a YAML text file"),
    (b"train: {steps: 3\n", "not valid YAML"),
    (b"- train\n- steps\n", "expected a mapping of config sections"),
    (b"train: {stepz: 3}\n", "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (b"train: {batch_size: 0}\n", "train.batch_size = 0: expected an integer >= 1"),
])
def test_a_bad_config_file_is_one_config_error_naming_it(tmp_path, content, words):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, [TILES])
    assert words in str(info.value)
    if "=" not in words:
        assert str(path) in str(info.value)


def test_yaml_exponents_are_numbers():
    cfg = load_config(None, [TILES, "optim.lr=1e-3", "optim.min_lr=5E-7"])
    assert cfg["optim"]["lr"] == 1e-3 and cfg["optim"]["min_lr"] == 5e-7


def test_the_schema_covers_every_default_key():
    assert sorted(schema_paths()) == sorted(SCHEMA)


BUNDLED = sorted(pathlib.Path(EXPERIMENTS_DIR).glob("*.yaml"))


def test_every_bundled_experiment_is_checked():
    assert {p.stem for p in BUNDLED} >= {"tiny_cpu", "gpfm_vitl14", "vits14_expert_uni",
                                         "bundled_student"}


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_every_bundled_experiment_config_validates(path):
    cfg = load_config(path, [TILES])  # the file and the defaults under it
    validate(cfg)
    assert load_config(path.stem, [TILES]) == cfg


def test_hand_built_configs_are_validated_by_the_run(tmp_path, monkeypatch):
    """A config merged without load_config is validated before anything is built."""
    import napari_gpfm.distill.train as train

    def never(*args, **kwargs):
        raise AssertionError("built something before validating")

    monkeypatch.setattr(train, "build_source", never)
    monkeypatch.setattr(train, "init_distributed", never)
    cfg = merge(load_config(None, [TILES]), nest_dotted({
        "train.batch_size": 0, "output.dir": str(tmp_path / "run")}))
    with pytest.raises(ConfigError, match=r"train\.batch_size = 0: expected an integer >= 1"):
        train.run_distillation(cfg)
    assert not (tmp_path / "run").exists()
    cfg = load_config(None, [TILES, f"output.dir={tmp_path / 'run'}"])
    del cfg["train"]["precision"]  # was KeyError: 'precision' deep inside the run
    with pytest.raises(ConfigError, match=r"train\.precision is missing"):
        train.run_distillation(cfg)


# -- experts without weights: refused unless optional ---------------------------------------------
@pytest.fixture
def weightless_card(tmp_path, monkeypatch):
    """A registry model ('weightless') whose weights are nowhere on this machine."""
    write_tiny_card(tmp_path / "models", "weightless")
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(tmp_path / "models"))
    return "weightless"


def test_an_expert_without_weights_is_refused_naming_it(weightless_card, tmp_path, monkeypatch):
    import napari_gpfm.distill.train as train
    from napari_gpfm.distill.experts import resolve_experts
    from napari_gpfm.encoders import WeightsNotFoundError

    cfg = load_config(None, [TILES, f"output.dir={tmp_path / 'run'}",
                             "experts.models.teacher1={encoder: weightless, cls_weight: 1.0}"])
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_experts(cfg)
    message = str(info.value)
    assert "expert 'teacher1' (experts.models.teacher1, model 'weightless') has no weights" \
        in message
    assert "No weights for model 'weightless'" in message  # the card's how-to-get-them text
    assert "experts.models.teacher1.optional=true" in message

    def never(*args, **kwargs):
        raise AssertionError("built something before checking the experts' weights")

    monkeypatch.setattr(train, "build_source", never)
    with pytest.raises(WeightsNotFoundError, match="expert 'teacher1'"):
        train.run_distillation(cfg)

    missing = tmp_path / "nowhere.pth"
    cfg["experts"]["models"]["teacher1"]["weights"] = str(missing)
    with pytest.raises(WeightsNotFoundError, match=f"its weights file {missing}"):
        resolve_experts(cfg)


def test_an_optional_expert_without_weights_is_left_out_and_said(weightless_card):
    from napari_gpfm.distill.experts import resolve_experts

    cfg = load_config(None, [
        TILES,
        "experts.models.teacher1={encoder: weightless, cls_weight: 1.0, optional: true}",
        "experts.models.off={encoder: weightless, cls_weight: 0, patch_weight: 0}",
        "experts.models.tiny={timm: {name: vit_tiny_patch16_224}, cls_weight: 1.0}",
        "experts.models.rnd={encoder: weightless, cls_weight: 1.0, allow_random: true}",
    ])
    active, notes = resolve_experts(cfg)
    assert sorted(active) == ["rnd", "tiny"]
    assert any(n.startswith("experts.models.teacher1 is optional and its weights are missing: "
                            "training without expert 'teacher1'") for n in notes), notes
    assert any("experts.models.off: cls_weight and patch_weight are both 0" in n for n in notes)


def test_validating_a_config_again_builds_no_model(monkeypatch):
    """The Finetune dock validates its config on the main thread whenever a model appears:
    the second validation of the same student reuses the meta model instead of rebuilding it
    (0.1–0.2 s each)."""
    import timm

    from napari_gpfm.distill import config as config_mod

    built: list[str] = []
    real = timm.create_model

    def spy(name, *a, **k):
        built.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(timm, "create_model", spy)
    monkeypatch.setattr(config_mod, "_META_MODELS", {})
    first = config_mod.load_config("tiny_cpu", [TILES])
    config_mod.load_config("tiny_cpu", [TILES])
    assert built.count(first["student"]["arch"]) == 1
