"""Safe checkpoint reading, layout converters and strict loading.

Reading never runs code from a file: ``.safetensors`` go through safetensors, anything else
through ``torch.load(..., weights_only=True)``; a pickle that asks for other objects is refused.

Converters follow timm's ``checkpoint_filter_fn`` pattern: unwrap containers and call one small
function per layout that returns a new state dict with timm key names. The model card's
``checkpoint_layout`` chooses the converter; the origin detected from sentinel keys only checks
that the file is of that layout (`LayoutMismatchError` names the file, the card's layout and
the detected one). The result is then loaded strictly, and any missing, unexpected or
mis-shaped key is reported with the file and the model named. A file holding NaN or infinite values (a
diverged training run, a damaged download) is refused before loading, naming the first such
tensor.

Layouts (a card's ``checkpoint_layout``; see ``docs/ARCHITECTURE.md``):

- ``gpfm``: GPFM's release file ``{'teacher': sd}``: ``backbone.`` prefix, FSDP-chunked blocks
  ``backbone.blocks.<chunk>.<i>.…``, DINO/iBOT heads and ``mask_token`` to drop; GPFM's flat
  timm-key copy (Hugging Face) is accepted too.
- ``timm``: flat timm keys, possibly wrapped in ``state_dict`` or ``model`` (UNI's release,
  trained students).
- ``phikon``: Hugging Face ``ViTModel`` keys (``embeddings.*``, ``encoder.layer.<i>.…`` with
  separate query/key/value), fused into timm's ``qkv``.
- ``conch``: CONCH's CoCa checkpoint; the vision tower ``visual.trunk.*`` (timm keys) and its
  contrastive attentional pooler are kept, the text tower and captioning pooler dropped.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from .errors import (
    CheckpointError,
    LayoutMismatchError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)

StateDict = dict[str, Any]
_HASH_CHUNK = 1 << 20
_WRAPPER_KEYS = ("teacher", "state_dict", "model")


# -- reading -------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The mapping stored in ``path`` (tensors, possibly nested under a wrapper key).

    Raises `UnsafeCheckpointError` for a pickle that would build anything but tensors and plain
    containers (e.g. run a command), and `CheckpointError` for a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except (safetensors.SafetensorError, OSError) as exc:
            raise CheckpointError(path, f"not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if "global" not in reason.lower():
            raise CheckpointError(
                path,
                f"not a readable PyTorch checkpoint: the safe loader rejected it ({reason}). "
                "Save plain state dicts with torch.save or as .safetensors.",
            ) from exc
        raise UnsafeCheckpointError(
            path,
            "refused to load: this pickle would call or build arbitrary Python objects when "
            f"opened ({reason}), which can run code. Only plain state dicts and .safetensors "
            "files are accepted; if you trust the file, re-save its state dict with torch.save "
            "or safetensors in a separate environment.",
        ) from exc
    except Exception as exc:  # torch.load raises many types for truncated or foreign files
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({exc!r})") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    return dict(obj)


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights-only error naming what it refused (a global or opcode)."""
    lines = [line.strip().rstrip(".") for line in str(exc).splitlines()]
    named = [line for line in lines if "unsupported" in line.lower()]
    return (named or lines or ["unknown reason"])[0]


# -- converters ----------------------------------------------------------------------------------
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_HF_PREFIX = "vit."
_HF_SENTINEL = "embeddings.patch_embeddings.projection.weight"
_HF_LAYER = r"^(?:encoder\.layer|layers)\.(\d+)\."
_HF_QKV = re.compile(
    _HF_LAYER + r"attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)$"
)
_HF_DROP = re.compile(r"^(?:pooler\.|embeddings\.mask_token$)")
_HF_RENAMES = [  # legacy (transformers < 5) and current ViTModel names -> timm names
    (re.compile(r"^embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
    (re.compile(_HF_LAYER + r"layernorm_before\."), r"blocks.\1.norm1."),
    (re.compile(_HF_LAYER + r"layernorm_after\."), r"blocks.\1.norm2."),
    (re.compile(_HF_LAYER + r"attention\.(?:output\.dense|o_proj)\."), r"blocks.\1.attn.proj."),
    (re.compile(_HF_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\."), r"blocks.\1.mlp.fc1."),
    (re.compile(_HF_LAYER + r"(?:output\.dense|mlp\.fc2)\."), r"blocks.\1.mlp.fc2."),
    (re.compile(r"^layernorm\."), "norm."),
]
_CONCH_KEEP = ("visual.trunk.", "visual.attn_pool_contrast.", "visual.ln_contrast.",
               "visual.proj_contrast")


def convert_gpfm(sd: StateDict) -> StateDict:
    """GPFM weights. The release teacher: keep ``backbone.*`` (dropping DINO/iBOT heads), strip
    the prefix, drop ``mask_token`` and renumber FSDP-chunked blocks. GPFM's flat timm-key copy
    (no ``backbone.`` key) goes through `convert_timm` as it is."""
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return convert_timm(sd)


def convert_timm(sd: StateDict) -> StateDict:
    """Flat timm keys: drop DINOv2's training-only ``mask_token``, renumber chunked blocks."""
    return _unchunk_blocks({k: v for k, v in sd.items() if k != "mask_token"})


def convert_hf_vit(sd: StateDict) -> StateDict:
    """Hugging Face ``ViTModel`` (Phikon) -> timm ViT: rename, and fuse query/key/value into
    ``qkv`` (q, k, v stacked along the output dimension); the pooler is dropped."""
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        key = key.removeprefix(_HF_PREFIX)
        if _HF_DROP.match(key):
            continue
        match = _HF_QKV.match(key)
        if match:
            part = (match[2] or {"q": "query", "k": "key", "v": "value"}[match[3]])
            qkv.setdefault((int(match[1]), match[4]), {})[part] = value
            continue
        for pattern, repl in _HF_RENAMES:
            new_key, hits = pattern.subn(repl, key, count=1)
            if hits:
                key = new_key
                break
        out[key] = value
    for (block, param), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {block} has only {sorted(parts)} of query/key/value {param}")
        out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


def convert_conch(sd: StateDict) -> StateDict:
    """CONCH (CoCa): keep the vision trunk and the contrastive pooling head, without ``visual.``."""
    return {k[len("visual."):]: v for k, v in sd.items() if k.startswith(_CONCH_KEEP)}


#: A card's ``checkpoint_layout`` -> the converter for its files (``card.LAYOUTS`` lists the
#: same names; tests/encoders check both lists and write a checkpoint for each layout).
CONVERTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "gpfm": convert_gpfm,
    "timm": convert_timm,
    "phikon": convert_hf_vit,
    "conch": convert_conch,
}
#: What `detect_layout` may say about a file of each layout: GPFM's weights come as its release
#: (``gpfm``) or as flat timm keys; every other layout is recognised only as itself.
ACCEPTED_FORMS: dict[str, tuple[str, ...]] = {
    "gpfm": ("gpfm", "timm"),
    "timm": ("timm",),
    "phikon": ("phikon",),
    "conch": ("conch",),
}
#: How each detected layout shows in a file, for mismatch messages.
FORM_EVIDENCE = {
    "gpfm": "keys under 'backbone.' (GPFM's release)",
    "conch": "keys under 'visual.trunk.' (a CONCH/CoCa checkpoint)",
    "phikon": f"Hugging Face ViTModel keys ('{_HF_SENTINEL}', as Phikon's)",
    "timm": "flat timm keys",
}


def unwrap_checkpoint(ckpt: Mapping[str, Any]) -> StateDict:
    """Peel ``teacher`` / ``state_dict`` / ``model`` containers and a DDP ``module.`` prefix."""
    sd = dict(ckpt)
    while True:
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if wrapper is None:
            break
        sd = dict(sd[wrapper])
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: Mapping[str, Any]) -> str:
    """The origin of an unwrapped state dict, from sentinel keys (a key of `CONVERTERS`)."""
    keys = list(sd)
    if any(k.startswith("backbone.") for k in keys):
        return "gpfm"
    if any(k.startswith("visual.trunk.") for k in keys):
        return "conch"
    if any(k.removeprefix(_HF_PREFIX) == _HF_SENTINEL for k in keys):
        return "phikon"
    return "timm"


def convert_checkpoint(
    ckpt: Mapping[str, Any], layout: str, *, path: str | Path, model_name: str | None = None
) -> StateDict:
    """Unwrap a loaded checkpoint and convert it with the converter of ``layout`` (a card's
    ``checkpoint_layout``) into timm keys.

    The layout detected from the keys must be one ``layout`` accepts (`ACCEPTED_FORMS`);
    otherwise `LayoutMismatchError` names ``path``, the expected and the detected layout.
    A layout without a converter raises ``ValueError``.
    """
    if layout not in CONVERTERS:
        raise ValueError(
            f"no converter for checkpoint layout {layout!r}; known: {', '.join(CONVERTERS)}"
        )
    sd = unwrap_checkpoint(ckpt)
    detected = detect_layout(sd)
    if detected not in ACCEPTED_FORMS[layout]:
        raise LayoutMismatchError(path, layout, detected, FORM_EVIDENCE[detected], model_name)
    return CONVERTERS[layout](sd)


def _unchunk_blocks(sd: StateDict) -> StateDict:
    """``blocks.<chunk>.<i>.x`` -> ``blocks.<n>.x``, numbering blocks in (chunk, i) order.

    Works whether ``i`` restarts in each chunk or continues the global count (DINOv2 pads
    later chunks with identities); a state dict without chunks is returned unchanged.
    """
    pairs = sorted({(int(m[1]), int(m[2])) for k in sd if (m := _CHUNKED_BLOCK.match(k))})
    if not pairs:
        return sd
    number = {pair: n for n, pair in enumerate(pairs)}
    out: StateDict = {}
    for key, value in sd.items():
        m = _CHUNKED_BLOCK.match(key)
        out[f"blocks.{number[(int(m[1]), int(m[2]))]}.{m[3]}" if m else key] = value
    return out


# -- finite values -------------------------------------------------------------------------------
class NonFiniteWeightsError(CheckpointError):
    """A checkpoint holds NaN or infinite values: it would embed everything as NaN."""


def check_finite(sd: Mapping[str, Any], path: str | Path) -> None:
    """Raise `NonFiniteWeightsError` naming ``path`` and the first tensor with NaN/inf values.

    One ``torch.isfinite(t).all()`` per floating-point tensor (a fraction of the reading time).
    """
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor)
           and (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if not bad:
        return
    first = sd[bad[0]]
    n_nan = int(torch.isnan(first).sum())
    n_inf = int(torch.isinf(first).sum())
    others = f"; {len(bad) - 1} more tensor(s) too" if len(bad) > 1 else ""
    raise NonFiniteWeightsError(
        path,
        f"tensor '{bad[0]}' holds non-finite values ({n_nan} NaN, {n_inf} inf of "
        f"{first.numel()}){others}. The file is damaged or comes from a training run that "
        "diverged; refusing to load it (every embedding would be NaN). Download or export the "
        "weights again.",
    )


# -- strict loading ------------------------------------------------------------------------------
def load_state_dict_strict(
    model: nn.Module, sd: Mapping[str, Any], *, path: str | Path, model_name: str, layout: str
) -> None:
    """Load ``sd`` into ``model`` only if keys and shapes match exactly; otherwise raise
    `StateDictMismatchError` listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} (file {tuple(getattr(v, 'shape', ()))}, model {tuple(expected[k].shape)})"
        for k, v in sd.items()
        if k in expected and getattr(v, "shape", None) != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise StateDictMismatchError(path, model_name, missing, unexpected, wrong, layout)
    model.load_state_dict(sd, strict=True)


def load_weights(model: nn.Module, path: str | Path, *, model_name: str,
                 expected_layout: str) -> None:
    """Read, convert with the converter of ``expected_layout`` (the card's
    ``checkpoint_layout``; the file must be of that layout), check (finite values) and strictly
    load a checkpoint into ``model``."""
    ckpt = load_checkpoint(path)
    try:
        sd = convert_checkpoint(ckpt, expected_layout, path=path, model_name=model_name)
    except ValueError as exc:
        raise CheckpointError(
            path, f"cannot convert the weights for '{model_name}': {exc}"
        ) from exc
    check_finite(sd, path)
    load_state_dict_strict(model, sd, path=path, model_name=model_name, layout=expected_layout)
