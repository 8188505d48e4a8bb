"""What produced a set of embeddings, and a stable hash of it.

Two feature files are interchangeable iff their :meth:`EmbeddingRecipe.key` matches: the key
covers every field that changes the features or the patch set (model, weights, mpp, tile
geometry, tissue parameters, precision) and deliberately *not* the software versions, the device
or where the mpp came from, so upgrading torch does not invalidate a cohort.

``precision`` ("fp32", "fp16", "bf16") joined the key in 0.3. A recipe without one (a store
made before) hashes as it always did, so such a store keeps its key; its precision is unknown
unless it records the device it ran on (:func:`legacy_precision`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EmbeddingRecipe",
    "KEY_FIELDS",
    "current_versions",
    "format_diff",
    "legacy_precision",
    "recipe_diff",
]

#: Fields hashed by :meth:`EmbeddingRecipe.key`.
KEY_FIELDS: tuple[str, ...] = (
    "model",
    "weights_sha256",
    "mpp",
    "target_mpp",
    "patch_size",
    "input_size",
    "patch_size_level0",
    "overlap",
    "min_tissue",
    "tissue_params",
    "precision",
)

#: Key fields left out of the hash when ``None`` (recipes written before they existed).
_OPTIONAL_KEY_FIELDS = frozenset({"precision"})

#: Float fields are rounded to this many decimals before hashing (robust to float noise).
_FLOAT_DECIMALS = 6


def current_versions() -> dict[str, str]:
    """Versions of napari-gpfm, torch, timm and numpy installed now."""
    import numpy

    import napari_gpfm

    from importlib.metadata import PackageNotFoundError, version

    out = {"napari_gpfm": napari_gpfm.__version__, "numpy": numpy.__version__}
    try:
        import torch  # its own version string keeps the build suffix (e.g. +cu130)

        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - optional in read-only installs
        out["torch"] = "absent"
    try:  # the installed distribution's version, without importing timm (seconds)
        out["timm"] = version("timm")
    except PackageNotFoundError:  # pragma: no cover
        out["timm"] = "absent"
    return out


@dataclass(frozen=True)
class EmbeddingRecipe:
    """Everything needed to reproduce (or judge the compatibility of) a feature file.

    Attributes:
        model: encoder registry name.
        weights_sha256: SHA-256 of the weights file (``None`` for random/unknown weights).
        mpp: level-0 µm/px used; ``mpp_source`` says where it came from ("file", "user").
        target_mpp: µm/px at which the patch field is defined.
        patch_size: field side in pixels at ``target_mpp``.
        input_size: side in pixels handed to the model.
        patch_size_level0: field side in level-0 pixels.
        overlap: overlap in pixels at ``target_mpp``.
        min_tissue: minimum tissue fraction of kept patches.
        tissue_params: :class:`~napari_gpfm.tiles.TissueParams` as a dict.
        versions: software versions (not part of the key).
        precision: "fp32", "fp16" or "bf16" (resolved, never "auto"); ``None`` for stores made
            before precision was recorded.
        device: where the features were computed ("cpu", "cuda (NVIDIA H200)"); not part of
            the key.
    """

    model: str
    weights_sha256: str | None
    mpp: float
    mpp_source: str | None
    target_mpp: float
    patch_size: int
    input_size: int
    patch_size_level0: int
    overlap: int
    min_tissue: float
    tissue_params: dict[str, Any]
    versions: dict[str, str] = field(default_factory=dict)
    precision: str | None = None
    device: str | None = None

    def key_fields(self) -> dict[str, Any]:
        """The hashed fields, normalised (floats rounded, dicts key-sorted); an optional field
        that is ``None`` is left out, so recipes written before it existed keep their key."""
        return {name: _normalise(getattr(self, name)) for name in KEY_FIELDS
                if not (name in _OPTIONAL_KEY_FIELDS and getattr(self, name) is None)}

    def key(self) -> str:
        """Stable 16-hex-digit hash of :meth:`key_fields`."""
        blob = json.dumps(self.key_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def diff(self, other: EmbeddingRecipe) -> dict[str, tuple[Any, Any]]:
        """Key fields whose (normalised) values differ: ``{name: (self value, other value)}``."""
        return recipe_diff(self.key_fields(), other.key_fields())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddingRecipe:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing optional ones defaulted."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("versions", {})
        kw.setdefault("mpp_source", None)
        return cls(**kw)

    def with_legacy_precision(self) -> EmbeddingRecipe:
        """This recipe with ``precision`` filled in by :func:`legacy_precision` when it has
        none and its device says what it was (unchanged otherwise)."""
        if self.precision is not None:
            return self
        inferred = legacy_precision(self.device)
        return self if inferred is None else dataclasses.replace(self, precision=inferred)

    @classmethod
    def from_json(cls, text: str) -> EmbeddingRecipe:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def legacy_precision(device: str | None) -> str | None:
    """What a store that records no precision was computed in, from the device it records:
    fp32 on the CPU, bf16 on CUDA (the only rule before 0.3: bf16 autocast, no opt-out);
    ``None`` when the device is not recorded either (unknown: never guessed)."""
    if not device:
        return None
    kind = str(device).split(":")[0].split(" ")[0].strip().lower()
    return {"cpu": "fp32", "cuda": "bf16"}.get(kind)


def recipe_diff(
    found: Mapping[str, Any], expected: Mapping[str, Any], keys: Iterable[str] = KEY_FIELDS
) -> dict[str, tuple[Any, Any]]:
    """The one recipe comparison: ``{key: (found value, expected value)}`` for each of ``keys``
    that ``expected`` sets and whose values differ after the normalisation of
    :meth:`EmbeddingRecipe.key` (floats rounded to 6 decimals, ints and floats alike, dicts
    key-sorted). Keys absent from ``expected`` are not constrained."""
    return {
        k: (found.get(k), expected[k])
        for k in keys
        if k in expected and _normalise(found.get(k)) != _normalise(expected[k])
    }


def format_diff(
    diff: dict[str, tuple[Any, Any]], left: str = "file", right: str = "expected"
) -> str:
    """Human-readable ``field: left=… expected=…`` lines."""
    return "; ".join(f"{k}: {left}={a!r} {right}={b!r}" for k, (a, b) in diff.items())


def _normalise(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        # ints and floats alike, so 5000 and 5000.0 hash the same
        return round(float(v), _FLOAT_DECIMALS)
    if isinstance(v, dict):
        return {str(k): _normalise(v[k]) for k in sorted(v)}
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if hasattr(v, "item"):  # numpy scalar
        return _normalise(v.item())
    return v
