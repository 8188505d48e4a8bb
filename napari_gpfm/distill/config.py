"""Distillation config: defaults <- experiment file <- CLI dotlist, validated and hashable.

A config is a plain nested ``dict`` loaded from YAML. ``configs/default.yaml`` holds every key;
experiment files and ``key.sub=value`` overrides may only set keys that exist there (an unknown
key is refused with the closest known key suggested), except under the open sections listed in
:data:`OPEN_SECTIONS` (free-form mappings such as timm kwargs).

:func:`validate` checks every key against :data:`SCHEMA` (type and range) and the keys that
depend on each other (crop sizes against the student's patch size, the student architecture
and kwargs by building it on PyTorch's ``meta`` device, which allocates nothing, the expert
entries, the device against this machine). Any problem is one :class:`ConfigError` naming the
key, the value and what is allowed, raised before anything is built.

YAML numbers: ``1e-3`` is read as a float (YAML 1.2), not as the string PyYAML's YAML 1.1 rules
make of it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from napari_gpfm.errors import NapariGpfmError

Config = dict[str, Any]

DEFAULT_CONFIG_PATH = Path(__file__).parent / "configs" / "default.yaml"
EXPERIMENTS_DIR = Path(__file__).parent / "configs" / "experiments"
#: Sections whose children are user-defined names, not fixed keys.
OPEN_SECTIONS = frozenset({"student.kwargs", "experts.models"})
LR_SCALING_RULES = ("sqrt", "linear", "none")
PRECISIONS = ("bf16", "fp16", "fp32")
CONFIG_FILENAME = "config.yaml"
#: Keys of one ``experts.models.<name>`` entry.
EXPERT_KEYS = ("encoder", "timm", "weights", "cls_weight", "patch_weight", "allow_random",
               "optional", "cls_target", "input_size")
CENTERINGS = ("centering", "sinkhorn_knopp")
EXPERT_CLS_LOSSES = ("cosine", "kl")
CLIP_SCOPES = ("per_module", "global")
CLS_TARGETS = ("embedding", "cls_token")
#: timm kwargs a config may not set in ``student.kwargs`` and the key that sets them instead.
STUDENT_KWARGS_ELSEWHERE = {
    "img_size": "crops.global_size",
    "num_classes": "nothing (the student has no classes)",
    "init_values": "student.layerscale_init",
    "drop_path_rate": "student.drop_path_rate",
}
STUDENT_EXAMPLES = "vit_small_patch14_dinov2, vit_base_patch14_dinov2, vit_large_patch14_dinov2"


class ConfigError(NapariGpfmError, ValueError):
    """A config file or override names an unknown key or holds an invalid value.

    ``key``, ``value`` and ``allowed`` are set when one key is at fault; the message names all
    three.
    """

    def __init__(self, message: str, *, key: str | None = None, value: Any = None,
                 allowed: str | None = None) -> None:
        super().__init__(message)
        self.key, self.value, self.allowed = key, value, allowed


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_value(key: str, value: Any, allowed: str, why: str = "") -> ConfigError:
    """``<key> = <value>: <why; >expected <allowed>``."""
    return ConfigError(f"{key} = {_shown(value)}: {why + '; ' if why else ''}expected {allowed}",
                       key=key, value=value, allowed=allowed)


# -- YAML ----------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading ``1e-3`` / ``5e4`` as floats (YAML 1.2), not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _read_yaml_file(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8); "
                          "expected a distillation config such as "
                          f"{EXPERIMENTS_DIR / 'tiny_cpu.yaml'}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
    if "\x00" in text:
        raise ConfigError(f"{path}: not a YAML text file (it holds NUL bytes)")
    try:
        return _yaml(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{line}: {problem}") from exc


# -- loading and merging -------------------------------------------------------------------------
def load_defaults() -> Config:
    """The default config with every key."""
    return _yaml(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))


def nest_dotted(values: Mapping[str, Any]) -> Config:
    """``{"train.steps": 20}`` -> ``{"train": {"steps": 20}}``."""
    out: Config = {}
    for key, value in values.items():
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} sets a key inside {part!r}, which another "
                                  "override sets to a value")
        node[leaf] = value
    return out


def parse_dotlist(items: Sequence[str]) -> Config:
    """``["train.steps=20", "crops.global_scale=[0.3,1]"]`` -> nested dict (YAML values)."""
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            pairs[key.strip()] = _yaml(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") \
                from exc
    return nest_dotted(pairs)


def _known_paths(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.append(path)
        if isinstance(value, Mapping) and not _is_open(path):
            out += _known_paths(value, path)
    return out


def unknown_key(path: str, siblings: Sequence[str] = ()) -> ConfigError:
    """"unknown config key 'train.stepz' (did you mean 'train.steps'?)"."""
    known = _known_paths(load_defaults())
    parent = path.rpartition(".")[0]
    local = [f"{parent}.{s}" if parent else str(s) for s in siblings]
    close = difflib.get_close_matches(path, local, n=1, cutoff=0.6) or difflib.get_close_matches(
        path, known, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif local:
        hint = "known keys here: " + ", ".join(local)
    else:
        hint = "see " + str(DEFAULT_CONFIG_PATH)
    return ConfigError(f"unknown config key {path!r} ({hint})", key=path)


def merge(base: Mapping[str, Any], override: Mapping[str, Any], _path: str = "") -> Config:
    """Return ``base`` updated recursively by ``override``, refusing keys unknown to ``base``
    (with the closest known key suggested) and a value where ``base`` has a section."""
    if not isinstance(override, Mapping):
        where = _path or "the config"
        raise ConfigError(f"{where} = {_shown(override)}: expected a mapping of keys")
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        path = f"{_path}.{key}" if _path else str(key)
        if key not in out:
            if not _is_open(_path):
                raise unknown_key(path, [str(k) for k in out])
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = merge(out[key], value, path)
        elif isinstance(out[key], dict) and not _is_open(path):
            first = next(iter(out[key]), "key")
            raise bad_value(path, value, f"a mapping of the {path}.* keys "
                                         f"(e.g. {path}.{first}=...)")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_open(path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in OPEN_SECTIONS)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the stem of a bundled experiment file (``"tiny_cpu"``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    if path.exists():
        raise ConfigError(f"config {str(name_or_path)!r} is not a file")
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {str(name_or_path)!r} not found (nor in {EXPERIMENTS_DIR}: "
                      f"{', '.join(names)})")


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> Config:
    """Merge defaults <- experiment file ``path`` <- ``overrides`` (dotlist or nested dict),
    then :func:`validate`."""
    cfg = load_defaults()
    if path is not None:
        file = resolve_config_path(path)
        file_cfg = _read_yaml_file(file)
        if file_cfg is None:
            file_cfg = {}
        if not isinstance(file_cfg, Mapping):
            raise ConfigError(f"{file}: expected a mapping of config sections "
                              f"({', '.join(cfg)}), found {_shown(file_cfg, 60)}")
        try:
            cfg = merge(cfg, file_cfg)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}", key=exc.key, value=exc.value,
                              allowed=exc.allowed) from exc
    extra = overrides if isinstance(overrides, Mapping) else parse_dotlist(overrides)
    cfg = merge(cfg, extra)
    validate(cfg)
    return cfg


# -- schema --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """What a key accepts: ``check(value)`` and the words for it (``"an integer >= 1"``)."""

    check: Callable[[Any], bool]
    allowed: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _range_words(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def _in_range(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (v <= lo if lo_open else v < lo):
        return False
    return not (hi is not None and (v >= hi if hi_open else v > hi))


def Int(lo: int | None = None, hi: int | None = None) -> Spec:  # noqa: N802 (a spec factory)
    words = " ".join(filter(None, ["an integer", _range_words(lo, hi, False, False)]))
    return Spec(lambda v: _is_int(v) and _in_range(v, lo, hi, False, False), words)


def Num(lo: float | None = None, hi: float | None = None, lo_open: bool = False,  # noqa: N802
        hi_open: bool = False) -> Spec:
    words = " ".join(filter(None, ["a number", _range_words(lo, hi, lo_open, hi_open)]))
    return Spec(lambda v: _is_num(v) and _in_range(v, lo, hi, lo_open, hi_open), words)


def Pair(lo: float, hi: float, lo_open: bool = False) -> Spec:  # noqa: N802
    """``[min, max]`` with ``lo <= min <= max <= hi``."""
    rng = _range_words(lo, hi, lo_open, False)
    return Spec(
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2
        and all(_is_num(x) and _in_range(x, lo, hi, lo_open, False) for x in v) and v[0] <= v[1],
        f"[min, max] with min <= max, both {rng}",
    )


def Numbers(n: int, lo: float | None = None, lo_open: bool = False,  # noqa: N802
            hi: float | None = None, hi_open: bool = False) -> Spec:
    rng = _range_words(lo, hi, lo_open, hi_open)
    return Spec(
        lambda v: isinstance(v, (list, tuple)) and len(v) == n
        and all(_is_num(x) and _in_range(x, lo, hi, lo_open, hi_open) for x in v),
        f"a list of {n} numbers" + (f" {rng}" if rng else ""),
    )


def Choice(*values: Any) -> Spec:  # noqa: N802
    return Spec(lambda v: isinstance(v, str) and v in values, "one of " + ", ".join(values))


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


BOOL = Spec(lambda v: isinstance(v, bool), "true or false")
TEXT = Spec(_nonempty_str, "a non-empty string")
PATH = Spec(_nonempty_str, "a path (a non-empty string)")
PATHS = Spec(lambda v: isinstance(v, list) and all(_nonempty_str(x) for x in v),
             "a list of paths, e.g. [/data/tiles] (may be empty)")
MAPPING = Spec(lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
               "a mapping of names to values")
PROB = Num(0.0, 1.0)
WEIGHT = Num(0.0)
POSITIVE = Num(0.0, lo_open=True)
MOMENTUM = Num(0.0, 1.0)


def Nullable(spec: Spec) -> Spec:  # noqa: N802
    return Spec(lambda v: v is None or spec.check(v), f"null or {spec.allowed}")


def _head(prefix: str) -> dict[str, Spec]:
    return {
        f"{prefix}.n_prototypes": Int(1),
        f"{prefix}.hidden_dim": Int(1),
        f"{prefix}.bottleneck_dim": Int(1),
        f"{prefix}.n_layers": Int(1),
        f"{prefix}.student_temp": POSITIVE,
        f"{prefix}.center_momentum": MOMENTUM,
        f"{prefix}.learn_prototype_gain": BOOL,
    }


#: Every leaf key of ``configs/default.yaml`` and what it accepts.
SCHEMA: dict[str, Spec] = {
    "student.arch": TEXT,  # and a timm ViT with a CLS token: checked by building it on "meta"
    "student.kwargs": MAPPING,
    "student.layerscale_init": Nullable(Num(0.0)),
    "student.drop_path_rate": Num(0.0, 1.0, hi_open=True),
    "student.drop_path_uniform": BOOL,
    "student.init": Nullable(Spec(_nonempty_str, "a registry model name or a weights file")),
    "student.init_strict": BOOL,
    "student.trainable_blocks": Nullable(Int(1)),
    "student.grad_checkpointing": BOOL,
    "teacher.momentum_start": MOMENTUM,
    "teacher.momentum_end": MOMENTUM,
    "teacher.temp": POSITIVE,
    "teacher.warmup_temp": POSITIVE,
    "teacher.warmup_temp_steps": Int(0),
    "teacher.centering": Choice(*CENTERINGS),
    "dino.weight": WEIGHT,
    **_head("dino"),
    "ibot.weight": WEIGHT,
    "ibot.separate_head": BOOL,
    **_head("ibot"),
    "ibot.mask_sample_probability": PROB,
    "ibot.mask_ratio_min_max": Pair(0.0, 0.5),
    "koleo.weight": WEIGHT,
    "experts.head_dim": Int(1),
    "experts.patch_cos_weight": WEIGHT,
    "experts.patch_smooth_l1_weight": WEIGHT,
    "experts.smooth_l1_beta": POSITIVE,
    "experts.cls_loss": Choice(*EXPERT_CLS_LOSSES),
    "experts.freeze_head_last_layer": BOOL,
    "experts.models": MAPPING,  # each entry: see _check_experts
    "supervised.weight": WEIGHT,
    "supervised.label_smoothing": Num(0.0, 1.0, hi_open=True),
    "supervised.require_labels": BOOL,
    "crops.global_size": Int(1),  # and a multiple of the student's patch size
    "crops.global_scale": Pair(0.0, 1.0, lo_open=True),
    "crops.local_number": Int(0),
    "crops.local_size": Int(1),  # and a multiple of the student's patch size
    "crops.local_scale": Pair(0.0, 1.0, lo_open=True),
    "crops.jitter.p": PROB,
    "crops.jitter.brightness": Num(0.0, 1.0),
    "crops.jitter.contrast": Num(0.0, 1.0),
    "crops.jitter.saturation": Num(0.0, 1.0),
    "crops.jitter.hue": Num(0.0, 0.5),
    "crops.grayscale_p": PROB,
    "crops.blur_p.global1": PROB,
    "crops.blur_p.global2": PROB,
    "crops.blur_p.local": PROB,
    "crops.blur_sigma": Pair(0.0, 100.0, lo_open=True),
    "crops.solarize_p": PROB,
    "crops.hed.p": PROB,
    "crops.hed.alpha": Num(0.0, 1.0),
    "crops.hed.beta": Num(0.0, 1.0),
    "crops.mean": Numbers(3, 0.0, hi=1.0),
    "crops.std": Numbers(3, 0.0, lo_open=True),
    "data.tiles": PATHS,
    "data.slides": PATHS,
    "data.slide_mpp": Nullable(POSITIVE),
    "data.target_mpp": POSITIVE,
    "data.multi_mpp": Spec(lambda v: isinstance(v, list) and all(POSITIVE.check(x) for x in v),
                           "a list of mpp > 0 (may be empty)"),
    "data.random_position": BOOL,
    "data.annotations": BOOL,
    "data.patch_size": Int(8),
    "data.min_tissue": PROB,
    "data.num_workers": Int(0),
    "optim.lr": POSITIVE,
    "optim.lr_scaling": Choice(*LR_SCALING_RULES),
    "optim.lr_reference_batch": Int(1),
    "optim.min_lr": Num(0.0),
    "optim.weight_decay": Num(0.0),
    "optim.weight_decay_end": Num(0.0),
    "optim.betas": Numbers(2, 0.0, hi=1.0, hi_open=True),
    "optim.layerwise_decay": Num(0.0, 1.0, lo_open=True),
    "optim.patch_embed_lr_mult": Num(0.0),
    "optim.clip_grad": Num(0.0),
    "optim.clip_grad_scope": Choice(*CLIP_SCOPES),
    "schedules.warmup_steps": Int(0),
    "schedules.freeze_last_layer_steps": Nullable(Int(0)),
    "train.steps": Int(1),
    "train.batch_size": Int(1),
    "train.accumulation_steps": Int(1),
    "train.seed": Int(0),
    "train.device": Spec(_nonempty_str, "auto, cpu, cuda or cuda:N"),  # and present here
    "train.precision": Choice(*PRECISIONS),
    "train.checkpoint_every": Int(1),
    "train.keep_checkpoints": Int(0),
    "train.resume": Spec(lambda v: isinstance(v, bool) or _nonempty_str(v),
                         "true, false or the path of a checkpoint directory"),
    "train.progress": BOOL,
    "train.tensorboard": BOOL,
    "output.dir": PATH,
    "output.models_dir": Nullable(PATH),
    "output.model_name": Nullable(Spec(
        lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) is not None,
        "a model name of letters, digits, '.', '_' and '-'")),
    "output.export_fp16": BOOL,
    "output.license": TEXT,
}

EXPERT_SCHEMA: dict[str, Spec] = {
    "encoder": TEXT,
    "timm": MAPPING,
    "weights": Nullable(PATH),
    "cls_weight": WEIGHT,
    "patch_weight": WEIGHT,
    "allow_random": BOOL,
    "optional": BOOL,
    "cls_target": Choice(*CLS_TARGETS),
    "input_size": Nullable(Int(1)),
}


def schema_paths(defaults: Mapping[str, Any] | None = None, prefix: str = "") -> list[str]:
    """The leaf keys of ``configs/default.yaml`` (open sections count as leaves)."""
    node = load_defaults() if defaults is None else defaults
    out = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and path not in OPEN_SECTIONS:
            out += schema_paths(value, path)
        else:
            out.append(path)
    return out


def _check_tree(cfg: Any, defaults: Mapping[str, Any], prefix: str = "") -> None:
    """Every key of ``defaults`` present with a value its :data:`SCHEMA` entry accepts, and no
    other key."""
    if not isinstance(cfg, Mapping):
        raise bad_value(prefix or "config", cfg, f"a mapping of the {prefix or 'config'} keys")
    for key in cfg:
        if key not in defaults:
            raise unknown_key(f"{prefix}.{key}" if prefix else str(key), [str(k) for k in defaults])
    for key, default in defaults.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in cfg:
            raise ConfigError(f"{path} is missing: a config holds every key of "
                              f"{DEFAULT_CONFIG_PATH.name} (load it with load_config)", key=path)
        value = cfg[key]
        if isinstance(default, dict) and path not in OPEN_SECTIONS:
            if not isinstance(value, Mapping):
                raise bad_value(path, value, f"a mapping of the {path}.* keys")
            _check_tree(value, default, path)
            continue
        spec = SCHEMA[path]
        if not spec.check(value):
            raise bad_value(path, value, spec.allowed)


def validate(cfg: Config) -> None:
    """Check every key (type and range, :data:`SCHEMA`) and the keys that depend on each other;
    raise one :class:`ConfigError` naming the key, the value and what is allowed.

    Builds nothing: the student and timm experts are instantiated on the ``meta`` device.
    """
    _check_tree(cfg, load_defaults())
    if not cfg["data"]["tiles"] and not cfg["data"]["slides"]:
        raise ConfigError("data.tiles and data.slides are both empty: set data.tiles and/or "
                          "data.slides (folders of tiles, slide files or folders of slides)",
                          key="data.tiles", value=[], allowed="at least one folder or slide")
    _check_experts(cfg["experts"]["models"])
    _check_student(cfg)
    check_device(cfg["train"]["device"])


def _check_experts(models: Mapping[str, Any]) -> None:
    for name, spec in models.items():
        key = f"experts.models.{name}"
        if not isinstance(spec, Mapping):
            raise bad_value(key, spec, "a mapping such as {encoder: uni, cls_weight: 1.0, "
                                       "patch_weight: 0.25} or {timm: {name: ...}, ...}")
        for sub in spec:
            if sub not in EXPERT_SCHEMA:
                close = difflib.get_close_matches(str(sub), EXPERT_KEYS, n=1, cutoff=0.6)
                hint = f"did you mean '{key}.{close[0]}'?" if close else \
                    "known keys: " + ", ".join(EXPERT_KEYS)
                raise ConfigError(f"unknown config key '{key}.{sub}' ({hint})", key=f"{key}.{sub}")
        if ("encoder" in spec) == ("timm" in spec):
            raise ConfigError(f"{key} needs exactly one of 'encoder' (a registry model) or "
                              "'timm' (a randomly initialised timm ViT)", key=key, value=spec)
        for sub, value in spec.items():
            if not EXPERT_SCHEMA[sub].check(value):
                raise bad_value(f"{key}.{sub}", value, EXPERT_SCHEMA[sub].allowed)
        if "cls_weight" not in spec and "patch_weight" not in spec:
            raise ConfigError(
                f"{key} gives neither cls_weight nor patch_weight: set at least one (numbers "
                ">= 0; both 0 switches the expert off)", key=key, value=spec,
                allowed="cls_weight and/or patch_weight")
        if "encoder" in spec:
            _check_registry_model(f"{key}.encoder", spec["encoder"])
        else:
            _check_timm_expert(key, spec["timm"])


def _check_registry_model(key: str, name: str) -> None:
    from napari_gpfm.encoders import list_cards

    known = sorted(card.name for card in list_cards())
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise bad_value(key, name, "a model of the encoder registry: " + ", ".join(known),
                        f"no such model card{hint}")


def _check_timm_expert(key: str, spec: Mapping[str, Any]) -> None:
    name, kwargs = spec.get("name"), spec.get("kwargs", {})
    extra = set(spec) - {"name", "kwargs"}
    if extra:
        raise unknown_key(f"{key}.timm.{sorted(extra)[0]}", ["name", "kwargs"])
    if not _nonempty_str(name):
        raise bad_value(f"{key}.timm.name", name, "a timm ViT name, e.g. vit_tiny_patch16_224")
    if not MAPPING.check(kwargs):
        raise bad_value(f"{key}.timm.kwargs", kwargs, MAPPING.allowed)
    model = _meta_model(f"{key}.timm.name", name, f"{key}.timm.kwargs", kwargs,
                        {"pretrained": False, "num_classes": 0, **kwargs})
    if getattr(model, "patch_embed", None) is None or not hasattr(model, "num_prefix_tokens"):
        raise bad_value(f"{key}.timm.name", name, "a timm ViT (patch and CLS tokens)")


#: Meta models already built, by (arch, build kwargs): validation only reads them, and docks
#: validate a config on the main thread (building one costs 0.1–0.2 s).
_META_MODELS: dict[str, Any] = {}


def _meta_model(arch_key: str, arch: str, kwargs_key: str, kwargs: Mapping[str, Any],
                build: dict[str, Any]) -> Any:
    """``timm.create_model(arch, **build)`` on the meta device (no memory), errors named; the
    model is cached (callers only read it)."""
    key = repr((arch, sorted((k, repr(v)) for k, v in build.items())))
    if key not in _META_MODELS:
        if len(_META_MODELS) >= 16:
            _META_MODELS.clear()
        _META_MODELS[key] = _build_meta_model(arch_key, arch, kwargs_key, kwargs, build)
    return _META_MODELS[key]


def _build_meta_model(arch_key: str, arch: str, kwargs_key: str, kwargs: Mapping[str, Any],
                      build: dict[str, Any]) -> Any:
    import timm
    import torch

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models("vit*"), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise bad_value(arch_key, arch, f"a timm ViT with a CLS token, e.g. {STUDENT_EXAMPLES}",
                        f"timm has no such model{hint}")
    try:
        with torch.device("meta"):
            return timm.create_model(arch, **build)
    except TypeError as exc:
        if "dynamic_img_size" in str(exc):
            raise bad_value(arch_key, arch, f"a timm ViT with a CLS token, e.g. {STUDENT_EXAMPLES}",
                            "not a vision transformer") from exc
        raise bad_value(kwargs_key, dict(kwargs), f"keyword arguments {arch} accepts",
                        f"timm refuses them ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 (timm asserts and raises many types on bad kwargs)
        raise bad_value(kwargs_key, dict(kwargs), f"keyword arguments that build {arch}",
                        f"timm cannot build it ({type(exc).__name__}: {exc})") from exc


def student_patch_size(cfg: Config) -> int:
    """The student's patch size (its architecture built on the ``meta`` device)."""
    s = cfg["student"]
    for bad, where in STUDENT_KWARGS_ELSEWHERE.items():
        if bad in s["kwargs"]:
            raise bad_value(f"student.kwargs.{bad}", s["kwargs"][bad],
                            f"no such key here: it is set by {where}")
    build = {"pretrained": False, "dynamic_img_size": True, "drop_path_rate":
             s["drop_path_rate"], **student_timm_kwargs(cfg)}
    model = _meta_model("student.arch", s["arch"], "student.kwargs", s["kwargs"], build)
    if getattr(model, "cls_token", None) is None or getattr(model, "patch_embed", None) is None:
        raise bad_value("student.arch", s["arch"],
                        f"a timm ViT with a CLS token, e.g. {STUDENT_EXAMPLES}",
                        "it has no CLS token")
    depth, blocks = len(model.blocks), s["trainable_blocks"]
    if blocks is not None and blocks > depth:
        raise bad_value("student.trainable_blocks", blocks,
                        f"null or an integer in [1, {depth}] ({s['arch']} has {depth} blocks)")
    return int(model.patch_embed.patch_size[0])


def student_timm_kwargs(cfg: Config) -> dict[str, Any]:
    """timm kwargs of the student besides the arch: ``student.kwargs``, LayerScale
    (``student.layerscale_init``; null leaves the architecture's default), the global crop size
    and no classifier. These rebuild it for inference too."""
    s = cfg["student"]
    extra = {} if s["layerscale_init"] is None else {"init_values": float(s["layerscale_init"])}
    return {**s["kwargs"], **extra, "img_size": cfg["crops"]["global_size"], "num_classes": 0}


def init_kind(value: str) -> str:
    """``"card"`` when ``student.init`` names a registry model, ``"file"`` for an existing file;
    else :class:`ConfigError` naming the key, the value and the models known."""
    from napari_gpfm.encoders import list_cards

    known = sorted(card.name for card in list_cards())
    if value in known:
        return "card"
    path = Path(value).expanduser()
    if path.is_file():
        return "file"
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    why = (f"{path} is a folder, not a weights file" if path.is_dir()
           else f"neither a registry model nor an existing file{hint}")
    raise bad_value("student.init", value, "null, a weights file or a registry model: "
                    + ", ".join(known), why)


def init_overrides(value: str | None) -> dict[str, Any]:
    """Dotted overrides that start the student from ``value``: for a registry model also its
    architecture (``student.arch``, ``student.kwargs``, ``student.layerscale_init``), so
    ``--init gpfm`` needs nothing else; for a file only ``student.init`` (the config's
    architecture must fit it)."""
    if value is None:
        return {"student.init": None}
    if init_kind(value) != "card":
        return {"student.init": str(Path(value).expanduser())}
    from napari_gpfm.encoders import get_card

    arch = get_card(value).architecture
    kwargs = {k: v for k, v in arch.kwargs.items()
              if k not in ("img_size", "num_classes", "dynamic_img_size")}
    layerscale = kwargs.pop("init_values", None)
    return {"student.init": value, "student.arch": arch.timm_name, "student.kwargs": kwargs,
            "student.layerscale_init": layerscale}


def init_dotlist(value: str | None) -> list[str]:
    """:func:`init_overrides` as ``key=value`` strings (values in JSON, which is YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in init_overrides(value).items()]


def _check_init(cfg: Config) -> None:
    """``student.init``: a registry model of the student's architecture, or a file."""
    value = cfg["student"]["init"]
    if value is None or init_kind(value) != "card":
        return
    from napari_gpfm.encoders import get_card

    arch = get_card(value).architecture
    want = init_overrides(value)
    if arch.timm_name != cfg["student"]["arch"]:
        raise bad_value("student.arch", cfg["student"]["arch"],
                        f"{arch.timm_name}, the architecture of student.init model '{value}' "
                        f"(with student.kwargs={want['student.kwargs']}; the command line's "
                        "--init sets both)", "does not match student.init")
    if arch.norm_eps is not None:
        raise bad_value("student.init", value, "a registry model built with timm's LayerNorm "
                        "epsilon (e.g. gpfm, uni, conch, a trained student)",
                        f"its card sets norm_eps={arch.norm_eps}, which a student cannot keep")


def _check_student(cfg: Config) -> None:
    _check_init(cfg)
    patch = student_patch_size(cfg)
    crops = cfg["crops"]
    for key in ("global_size", "local_size"):
        size = crops[key]
        if size < patch or size % patch:
            lower = max(patch, size // patch * patch)
            examples = sorted({lower, lower + patch})
            raise bad_value(
                f"crops.{key}", size,
                f"a multiple of the student's patch size {patch} ({cfg['student']['arch']}), "
                f"e.g. {' or '.join(str(e) for e in examples)}")


def check_device(device: str) -> None:
    """``train.device`` names a device this machine has (``auto`` always does)."""
    from napari_gpfm.encoders.device import resolve_device

    try:
        resolve_device(device)
    except RuntimeError as exc:
        import torch

        why = ("CUDA is not available on this machine" if "CUDA" in str(exc)
               else "not a device name")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        allowed = "auto or cpu" if not gpus else \
            f"auto, cpu, cuda or cuda:0..cuda:{gpus - 1}"
        raise bad_value("train.device", device, allowed, why) from exc
    if device.startswith("cuda:"):
        import torch

        index, count = int(device.split(":")[1]), torch.cuda.device_count()
        if index >= count:
            raise bad_value("train.device", device,
                            f"auto, cpu, cuda or cuda:0..cuda:{count - 1}",
                            f"this machine has {count} GPU(s)")


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """Peak learning rate after the configured batch-size scaling rule."""
    ratio = global_batch / cfg["optim"]["lr_reference_batch"]
    factor = {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[cfg["optim"]["lr_scaling"]]
    return cfg["optim"]["lr"] * factor


def config_hash(cfg: Config) -> str:
    """Stable SHA-256 of the config (key order independent)."""
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_config(cfg: Config, directory: str | Path) -> Path:
    """Write the merged config as ``config.yaml`` into ``directory`` (atomically)."""
    path = Path(directory) / CONFIG_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
