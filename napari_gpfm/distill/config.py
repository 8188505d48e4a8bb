"""Distillation config: defaults <- experiment file <- CLI dotlist, validated and hashable.

A config is a plain nested ``dict`` loaded from YAML. ``configs/default.yaml`` holds every key;
experiment files and ``key.sub=value`` overrides may only set keys that exist there, except under
the open sections listed in :data:`OPEN_SECTIONS` (free-form mappings such as timm kwargs).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
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
CONFIG_FILENAME = "config.yaml"


class ConfigError(NapariGpfmError, ValueError):
    """A config file or override names an unknown key or holds an invalid value."""


def load_defaults() -> Config:
    """The default config with every key."""
    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def nest_dotted(values: Mapping[str, Any]) -> Config:
    """``{"train.steps": 20}`` -> ``{"train": {"steps": 20}}``."""
    out: Config = {}
    for key, value in values.items():
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def parse_dotlist(items: Sequence[str]) -> Config:
    """``["train.steps=20", "crops.global_scale=[0.3,1]"]`` -> nested dict (YAML values)."""
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        pairs[key] = yaml.safe_load(raw)
    return nest_dotted(pairs)


def merge(base: Mapping[str, Any], override: Mapping[str, Any], _path: str = "") -> Config:
    """Return ``base`` updated recursively by ``override``, refusing keys unknown to ``base``."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        path = f"{_path}.{key}" if _path else str(key)
        if key not in out:
            if not _is_open(_path):
                raise ConfigError(f"unknown config key {path!r}")
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = merge(out[key], value, path)
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
    raise ConfigError(f"config file {str(name_or_path)!r} not found (nor in {EXPERIMENTS_DIR})")


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> Config:
    """Merge defaults <- experiment file ``path`` <- ``overrides`` (dotlist or nested dict)."""
    cfg = load_defaults()
    if path is not None:
        file_cfg = yaml.safe_load(resolve_config_path(path).read_text()) or {}
        cfg = merge(cfg, file_cfg)
    extra = overrides if isinstance(overrides, Mapping) else parse_dotlist(overrides)
    cfg = merge(cfg, extra)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values whose mistakes would only surface deep inside a run."""
    if cfg["optim"]["lr_scaling"] not in LR_SCALING_RULES:
        raise ConfigError(f"optim.lr_scaling must be one of {LR_SCALING_RULES}")
    if cfg["train"]["precision"] not in ("bf16", "fp16", "fp32"):
        raise ConfigError("train.precision must be bf16, fp16 or fp32")
    low, high = cfg["ibot"]["mask_ratio_min_max"]
    if not 0.0 <= low <= high <= 0.5:
        raise ConfigError("ibot.mask_ratio_min_max must satisfy 0 <= min <= max <= 0.5")
    if not cfg["data"]["tiles"] and not cfg["data"]["slides"]:
        raise ConfigError("set data.tiles and/or data.slides")
    for name, spec in cfg["experts"]["models"].items():
        if ("encoder" in spec) == ("timm" in spec):
            raise ConfigError(f"experts.models.{name} needs exactly one of 'encoder' or 'timm'")


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
    """Write the merged config as ``config.yaml`` into ``directory``."""
    path = Path(directory) / CONFIG_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
