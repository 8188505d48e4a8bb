"""Classifier files: one ``.safetensors`` file with the trained tensors and a JSON header.

Tensors: the TVP prompts, the refine module, the text projection and the encoded text
sentences, and the head (never the backbone). The safetensors metadata holds one JSON document
under ``napari_gpfm_pathotune``: format, backbone identity (card name, weights SHA-256, timm
architecture and kwargs, width, depth, input size), prompt config, class names and colours,
template and sentences, text encoder name, training info and a SHA-256 over the tensors.

:func:`load_pathotune` refuses to attach the prompts to any other backbone
(:class:`BackboneMismatchError` names the file and each differing field): prompts tuned for
one network's activations are meaningless on another's, even of the same architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_gpfm.analyses.classifier import ClassifierFileError

from .model import PathoTuneClassifier, PathoTuneModel, PromptConfig, backbone_identity
from .text import TextTemplate

__all__ = [
    "FORMAT",
    "BackboneMismatchError",
    "ClassifierFileError",
    "check_backbone",
    "load_pathotune",
    "read_header",
    "save_classifier",
]

FORMAT = "napari-gpfm-pathotune/1"
META_KEY = "napari_gpfm_pathotune"
SUFFIX = ".safetensors"
_RANDOM_PREFIX = "random-init-seed-"
_IDENTITY_KEYS = ("name", "weights_sha256", "timm_name", "kwargs", "embed_dim", "depth")


class BackboneMismatchError(ClassifierFileError):
    """The classifier was trained on another backbone than the one it would be attached to."""

    def __init__(self, path: str | os.PathLike, diff: dict[str, tuple[Any, Any]]) -> None:
        self.diff = diff
        lines = "; ".join(f"{k}: file has {a!r}, encoder has {b!r}" for k, (a, b) in diff.items())
        want = diff.get("name", (None,))[0] or "the same model"
        super().__init__(
            path,
            f"this PathoTune classifier was trained on a different backbone ({lines}). Its "
            f"prompts only work on the exact network they were tuned on: load {want} with the "
            "weights recorded in the file, or train a new classifier on this backbone.",
        )


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import timm

    import napari_gpfm

    return {"napari_gpfm": napari_gpfm.__version__, "torch": torch.__version__,
            "timm": timm.__version__}


def save_classifier(classifier: PathoTuneClassifier, path: str | os.PathLike) -> Path:
    """Write ``classifier`` to ``path`` (``.safetensors`` appended when missing); returns it."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    tensors = {k: v.detach().cpu().contiguous().clone()
               for k, v in classifier.model.trainable_state().items()}
    header = {
        "format": FORMAT,
        "backbone": backbone_identity(classifier.encoder),
        "prompt_config": classifier.config.to_dict(),
        "class_names": list(classifier.class_names),
        "colours": None if classifier.colours is None else np.asarray(classifier.colours).tolist(),
        "template": None if classifier.template is None else classifier.template.to_dict(),
        "sentences": list(classifier.sentences),
        "text_encoder": classifier.text_encoder_name,
        "info": classifier.info,
        "tensors_sha256": _digest(tensors),
        "versions": _versions(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(header, default=str)})
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a classifier file (no tensors, no model): e.g. to learn which
    backbone to load before :func:`load_pathotune`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ClassifierFileError(path, "PathoTune classifier file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ClassifierFileError(path, f"not a readable safetensors file ({exc})") from exc
    if META_KEY not in meta:
        raise ClassifierFileError(path, "a safetensors file, but not a PathoTune classifier "
                                        f"(no '{META_KEY}' metadata)")
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise ClassifierFileError(path, f"corrupt classifier metadata ({exc})") from exc
    if header.get("format") != FORMAT:
        raise ClassifierFileError(
            path, f"unsupported classifier format {header.get('format')!r} (expected {FORMAT})"
        )
    return header


def check_backbone(header: dict[str, Any], encoder: Any, path: str | os.PathLike) -> None:
    """Raise :class:`BackboneMismatchError` unless ``encoder`` is the recorded backbone."""
    want = header["backbone"]
    have = backbone_identity(encoder)
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - tuples vs lists
    diff = {k: (want.get(k), have.get(k)) for k in _IDENTITY_KEYS
            if norm(want.get(k)) != norm(have.get(k))}
    if diff:
        raise BackboneMismatchError(path, diff)


def load_pathotune(
    path: str | os.PathLike,
    encoder: Any = None,
    device: str | torch.device = "cpu",
    weights: str | os.PathLike | None = None,
) -> PathoTuneClassifier:
    """Load a classifier onto ``encoder`` (default: load the recorded backbone by card name,
    with ``weights`` if given; a random-init test backbone is rebuilt from its seed).

    Raises :class:`BackboneMismatchError` for another backbone and :class:`ClassifierFileError`
    for damaged or inconsistent files.
    """
    from safetensors.torch import load_file

    path = Path(path)
    header = read_header(path)
    if encoder is None:
        from napari_gpfm.encoders import load_encoder

        sha = str(header["backbone"]["weights_sha256"])
        seed = int(sha[len(_RANDOM_PREFIX):]) if sha.startswith(_RANDOM_PREFIX) else 0
        encoder = load_encoder(header["backbone"]["name"], weights=weights, device=device,
                               allow_random=sha.startswith(_RANDOM_PREFIX), seed=seed)
    check_backbone(header, encoder, path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ClassifierFileError(path, f"cannot read the tensors ({exc})") from exc
    if _digest(tensors) != header.get("tensors_sha256"):
        raise ClassifierFileError(path, "the tensors do not match their recorded SHA-256: the "
                                        "file is damaged")
    config = PromptConfig.from_dict(header["prompt_config"])
    names = [str(c) for c in header["class_names"]]
    model = PathoTuneModel(encoder.model, len(names), config, tensors.get("ttp.text"))
    expected = set(model.trainable_state())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ClassifierFileError(
            path, f"tensors do not fit the recorded prompt config (missing {missing}, "
                  f"unexpected {extra})"
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise ClassifierFileError(path, f"tensor shapes do not fit the backbone ({exc})") from exc
    model.to(next(encoder.model.parameters()).device).eval()
    colours = header.get("colours")
    template = header.get("template")
    return PathoTuneClassifier(
        encoder=encoder, model=model, class_names=names,
        colours=None if colours is None else np.asarray(colours, dtype=np.uint8),
        template=None if template is None else TextTemplate.from_dict(template),
        sentences=list(header.get("sentences") or []),
        text_encoder_name=header.get("text_encoder"), info=dict(header.get("info") or {}),
    )
