"""Start the student from pretrained weights (``student.init``); the teacher then copies it.

``student.init`` is a registry model name or a weights file:

- a **registry model** (``gpfm``, ``uni``, a trained student...) is loaded exactly as for
  inference (:func:`napari_gpfm.encoders.load_encoder`: the card's weights, its checkpoint
  layout, SHA-256 check, strict load), and its network's state is copied into the student,
  whose architecture must be the card's (``config.init_overrides`` sets it);
- a **weights file** is read with the same safe reader and layout converters as inference
  (:mod:`napari_gpfm.encoders.checkpoint`: safetensors or ``torch.load(weights_only=True)``,
  GPFM release ``{'teacher': ...}`` with ``backbone.`` prefix and chunked blocks, flat timm or
  Hugging Face layouts; non-finite values refused) and fitted to the configured student.

Fitting: a position embedding made for another grid is resampled (bicubic, timm's
``resample_abs_pos_embed``) and said so; any other shape mismatch is refused with
:class:`StudentInitError` naming the file and the keys. Missing or unexpected keys are refused too
(``student.init_strict: true``), or with ``init_strict: false`` loaded around and listed in the
report (a note in the run log and on the command line). A file of which nothing fits is always
refused: a non-strict load that silently loads nothing is a known pitfall.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_gpfm.errors import NapariGpfmError

from .config import Config, init_kind

LISTED_KEYS = 8


class StudentInitError(NapariGpfmError, ValueError):
    """``student.init``'s weights do not fit the student (the message names the file)."""


@dataclass
class InitReport:
    """What :func:`init_student` loaded: source, layout, counts and the keys left out."""

    source: str
    kind: str
    layout: str
    sha256: str | None
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)

    def message(self) -> str:
        parts = [f"student.init: student and teacher start from {self.source} ({self.kind}, "
                 f"layout {self.layout}): {self.loaded} tensors loaded, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"]
        if self.resampled:
            parts.append("resampled to the student's grid: " + ", ".join(self.resampled))
        if self.missing:
            parts.append("missing (left at random init): " + _listing(self.missing))
        if self.unexpected:
            parts.append("unexpected (ignored): " + _listing(self.unexpected))
        return "; ".join(parts)

    def provenance(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "layout": self.layout,
                "sha256": self.sha256, "tensors": self.loaded,
                "missing": len(self.missing), "unexpected": len(self.unexpected)}


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f" and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else "")


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def _resample_pos_embed(value: torch.Tensor, target: torch.Tensor, vit: nn.Module
                        ) -> torch.Tensor | None:
    """``value`` resampled to ``target``'s grid, or None when it is not a square grid of the
    same width."""
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    n_src, n_dst = value.shape[1] - prefix, target.shape[1] - prefix
    side_src, side_dst = int(round(n_src ** 0.5)), int(round(n_dst ** 0.5))
    if (value.ndim != 3 or value.shape[-1] != target.shape[-1] or side_src ** 2 != n_src
            or side_dst ** 2 != n_dst):
        return None
    return resample_abs_pos_embed(value.float(), (side_dst, side_dst), (side_src, side_src),
                                  num_prefix_tokens=prefix).to(target.dtype)


def fit_state_dict(vit: nn.Module, sd: Mapping[str, Any], *, source: str, strict: bool,
                   arch: str) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """(state dict to load, missing, unexpected, resampled) for ``vit``, or
    :class:`StudentInitError` naming ``source`` for wrong shapes, nothing in common, or (with
    ``strict``) missing/unexpected keys."""
    expected = vit.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    out: dict[str, torch.Tensor] = {}
    resampled, wrong = [], []
    for key, value in sd.items():
        if key not in expected:
            continue
        target = expected[key]
        if _shape(value) != tuple(target.shape):
            fixed = _resample_pos_embed(value, target, vit) if key == "pos_embed" else None
            if fixed is None:
                wrong.append(f"{key} (file {_shape(value)}, student {tuple(target.shape)})")
                continue
            resampled.append(f"{key} {_shape(value)} -> {tuple(target.shape)}")
            value = fixed
        out[key] = value
    head = f"{source}: the weights do not fit the student ({arch})"
    if wrong:
        raise StudentInitError(f"{head}: wrong shapes: {_listing(wrong)}. Set student.arch and "
                               "student.kwargs to the architecture these weights were trained "
                               "with (for a registry model, --init NAME sets them).")
    if not out:
        raise StudentInitError(f"{head}: no key of the file is a key of the student (file keys "
                               f"like {_listing(list(sd)[:3])}); is it a ViT checkpoint?")
    if strict and (missing or unexpected):
        parts = [f"missing keys (in the student, not in the file): {_listing(missing)}"
                 if missing else "",
                 f"unexpected keys (in the file, not in the student): {_listing(unexpected)}"
                 if unexpected else ""]
        raise StudentInitError(f"{head}: " + "; ".join(p for p in parts if p) + ". Set "
                               "student.init_strict=false to load the keys that fit and list "
                               "the others.")
    return out, missing, unexpected, resampled


def _card_state(name: str) -> tuple[dict[str, torch.Tensor], str, str, str]:
    """(network state, source shown, layout, sha256) of registry model ``name``, loaded as for
    inference."""
    from napari_gpfm.encoders import get_card, load_encoder

    encoder = load_encoder(get_card(name), device="cpu")
    model = encoder.model
    trunk = getattr(model, "trunk", model)  # a pooled model (CONCH): the ViT trunk only
    return (dict(trunk.state_dict()), f"model '{name}' ({encoder.weights_path})",
            encoder.card.checkpoint_layout, encoder.weights_sha256)


def _file_state(path: Path) -> tuple[dict[str, torch.Tensor], str, str, str]:
    from napari_gpfm.encoders.checkpoint import (
        check_finite,
        convert_checkpoint,
        detect_layout,
        load_checkpoint,
        sha256_file,
        unwrap_checkpoint,
    )
    from napari_gpfm.encoders.errors import CheckpointError

    ckpt = load_checkpoint(path)
    layout = detect_layout(unwrap_checkpoint(ckpt))  # a file has no card: its keys say which
    try:
        sd = convert_checkpoint(ckpt, layout, path=path, model_name="the student")
    except ValueError as exc:
        raise CheckpointError(path, f"cannot convert the weights for the student: {exc}") from exc
    check_finite(sd, path)
    return dict(sd), str(path), layout, sha256_file(path)


def init_student(vit: nn.Module, cfg: Config) -> InitReport | None:
    """Load ``student.init`` into the student's timm ViT ``vit`` (None: nothing to load)."""
    value = cfg["student"]["init"]
    if value is None:
        return None
    kind = init_kind(value)
    if kind == "card":
        sd, source, layout, digest = _card_state(value)
    else:
        sd, source, layout, digest = _file_state(Path(value).expanduser())
    fitted, missing, unexpected, resampled = fit_state_dict(
        vit, sd, source=source, strict=cfg["student"]["init_strict"],
        arch=cfg["student"]["arch"])
    with torch.no_grad():
        current = vit.state_dict()
        for key, value_ in fitted.items():
            current[key].copy_(value_.to(current[key].dtype))
    return InitReport(source, "registry model" if kind == "card" else "weights file", layout,
                      digest, len(fitted), missing, unexpected, resampled)
