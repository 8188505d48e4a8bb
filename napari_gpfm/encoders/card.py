"""Model cards: one YAML file per model (data, not code), parsed and validated into `ModelCard`.

The schema is documented in ``docs/ARCHITECTURE.md`` ("Model cards"). Beyond it, a card may set
``bundled_default: true`` (a model that may serve as the default when GPFM's weights are absent),
``architecture.norm_eps`` (LayerNorm epsilon, e.g. 1e-12 for Hugging Face ViTs) and
``architecture.pool`` (an attentional pooling head on the token sequence, as in CONCH).

Weights are looked for, in order: an explicit path, ``weights.file`` (relative to the card),
the environment variable ``weights.env``, then ``weights.default_path``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ModelCardError

#: Checkpoint layouts, one converter each (``checkpoint.CONVERTERS``; kept here so that reading
#: a card never imports torch).
LAYOUTS = ("gpfm", "timm", "phikon", "conch")
INTERPOLATIONS = ("bicubic", "bilinear")
POOL_TYPES = ("attentional",)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = object()


@dataclass(frozen=True)
class PoolSpec:
    """Attentional pooling head: one learned query attends over the trunk's tokens (CONCH)."""

    type: str
    dim: int
    heads: int = 8
    project: bool = True
    normalize: bool = False


@dataclass(frozen=True)
class Architecture:
    """How to build the network: ``timm.create_model(timm_name, pretrained=False, **kwargs)``."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    norm_eps: float | None = None
    pool: PoolSpec | None = None


@dataclass(frozen=True)
class InputSpec:
    """Preprocessing: square input side, resize interpolation, per-channel mean and std."""

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face Hub model repository."""

    repo_id: str
    filename: str
    revision: str | None = None

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


@dataclass(frozen=True)
class WeightsSpec:
    """Where the weights live or come from; ``sha256`` is verified on load when known."""

    file: str | None = None
    env: str | None = None
    default_path: str | None = None
    hf_hub: HubFile | None = None
    url: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class TileRecommendation:
    """Tiling the model was trained with: physical pixel size and patch side."""

    target_mpp: float
    patch_size: int


@dataclass(frozen=True)
class WeightsCandidate:
    """One place weights are looked for; ``path`` is None when an environment variable is unset."""

    source: str
    path: Path | None

    @property
    def exists(self) -> bool:
        return self.path is not None and self.path.is_file()

    def describe(self) -> str:
        if self.path is None:
            return f"{self.source}: not set"
        return f"{self.source}: {self.path} ({'found' if self.exists else 'not found'})"


@dataclass(frozen=True)
class WeightsStatus:
    """Whether a model's weights are on this machine, where, and under which licence."""

    found: bool
    path: Path | None
    source: str | None
    license: str
    gated: bool

    @property
    def state(self) -> str:
        return "found" if self.found else "missing"


@dataclass(frozen=True)
class ModelCard:
    """A validated model card. ``path`` is the YAML file it came from (None if built in code)."""

    name: str
    display_name: str
    is_gpfm: bool
    architecture: Architecture
    checkpoint_layout: str
    input: InputSpec
    embed_dim: int
    weights: WeightsSpec
    license: str
    gated: bool = False
    recommended_tiles: TileRecommendation | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    bundled_default: bool = False
    path: Path | None = field(default=None, compare=False)

    # -- reading and writing -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelCard:
        """Read and validate a card file; any problem raises `ModelCardError` naming the file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ModelCardError(path, f"cannot read the file ({exc.strerror or exc})") from exc
        except yaml.YAMLError as exc:
            raise ModelCardError(path, f"not valid YAML ({exc})") from exc
        return cls.from_dict(data, path=path)

    @classmethod
    def from_dict(cls, data: Any, path: str | Path | None = None) -> ModelCard:
        """Validate a mapping with the card schema (``path`` is used in messages and for
        resolving ``weights.file``)."""
        path = Path(path) if path is not None else None
        top = _Section(data, "", path)
        name = top.get("name", str)
        if not _NAME_RE.match(name):
            raise top.error(
                f"'name' must be lowercase letters, digits, '_', '.' or '-', got {name!r}"
            )
        layout = top.get("checkpoint_layout", str)
        if layout not in LAYOUTS:
            raise top.error(
                f"'checkpoint_layout' must be one of {', '.join(LAYOUTS)}, got {layout!r}"
            )
        embed_dim = top.get("embed_dim", int)
        if embed_dim <= 0:
            raise top.error(f"'embed_dim' must be a positive integer, got {embed_dim}")
        card = cls(
            name=name,
            display_name=top.get("display_name", str, default=name),
            is_gpfm=top.get("is_gpfm", bool, default=False),
            architecture=_parse_architecture(top.section("architecture")),
            checkpoint_layout=layout,
            input=_parse_input(top.section("input")),
            embed_dim=embed_dim,
            weights=_parse_weights(top.section("weights")),
            license=top.get("license", str),
            gated=top.get("gated", bool, default=False),
            recommended_tiles=_parse_tiles(top.section("recommended_tiles", required=False)),
            provenance=dict(top.get("provenance", Mapping, default={})),
            bundled_default=top.get("bundled_default", bool, default=False),
            path=path,
        )
        top.close()
        return card

    def to_dict(self) -> dict[str, Any]:
        """The card as plain data in schema order (optional extensions only when set)."""
        arch: dict[str, Any] = {"timm_name": self.architecture.timm_name,
                                "kwargs": dict(self.architecture.kwargs)}
        if self.architecture.norm_eps is not None:
            arch["norm_eps"] = self.architecture.norm_eps
        if self.architecture.pool is not None:
            arch["pool"] = asdict(self.architecture.pool)
        w = self.weights
        hub = None
        if w.hf_hub is not None:
            hub = {"repo_id": w.hf_hub.repo_id, "filename": w.hf_hub.filename}
            if w.hf_hub.revision is not None:
                hub["revision"] = w.hf_hub.revision
        data: dict[str, Any] = {
            "name": self.name,
            "display_name": self.display_name,
            "is_gpfm": self.is_gpfm,
            "architecture": arch,
            "checkpoint_layout": self.checkpoint_layout,
            "input": {"size": self.input.size, "interpolation": self.input.interpolation,
                      "mean": list(self.input.mean), "std": list(self.input.std)},
            "embed_dim": self.embed_dim,
            "weights": {"file": w.file, "env": w.env, "default_path": w.default_path,
                        "hf_hub": hub, "url": w.url, "sha256": w.sha256},
            "license": self.license,
            "gated": self.gated,
            "recommended_tiles": None if self.recommended_tiles is None else {
                "target_mpp": self.recommended_tiles.target_mpp,
                "patch_size": self.recommended_tiles.patch_size},
            "provenance": dict(self.provenance),
        }
        if self.bundled_default:
            data["bundled_default"] = True
        return data

    def to_yaml(self, path: str | Path) -> Path:
        """Write the card to ``path`` (``weights.file`` stays relative to the card)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path

    # -- weights -------------------------------------------------------------------------------
    def weights_candidates(self) -> list[WeightsCandidate]:
        """The places weights are looked for, in priority order (explicit paths excluded)."""
        w = self.weights
        out = []
        if w.file:
            file = Path(w.file).expanduser()
            if not file.is_absolute() and self.path is not None:
                file = self.path.parent / file
            out.append(WeightsCandidate("weights.file", file))
        if w.env:
            value = os.environ.get(w.env, "").strip()
            out.append(WeightsCandidate(f"${w.env}", Path(value).expanduser() if value else None))
        if w.default_path:
            out.append(WeightsCandidate("default path", Path(w.default_path).expanduser()))
        return out

    def resolve_weights(self, explicit: str | Path | None = None) -> Path | None:
        """The weights file to load: ``explicit`` if given (even if absent, so loading names it),
        else the first existing candidate, else None."""
        if explicit is not None:
            return Path(explicit).expanduser()
        return next((c.path for c in self.weights_candidates() if c.exists), None)

    def status(self) -> WeightsStatus:
        """Found or missing, the path (where found, or where it is expected), and the licence."""
        found = next((c for c in self.weights_candidates() if c.exists), None)
        if found is not None:
            return WeightsStatus(True, found.path, found.source, self.license, self.gated)
        return WeightsStatus(False, self.expected_path(), None, self.license, self.gated)

    def expected_path(self) -> Path | None:
        """Where the weights should be put: ``weights.file`` next to the card, else the default
        path."""
        for cand in self.weights_candidates():
            if cand.source in ("weights.file", "default path"):
                return cand.path
        return None

    def weights_filename(self) -> str | None:
        """The file name users should look for (hub file, URL basename or expected path)."""
        w = self.weights
        if w.hf_hub is not None:
            return Path(w.hf_hub.filename).name
        if w.url:
            return w.url.rstrip("/").rsplit("/", 1)[-1]
        expected = self.expected_path()
        return expected.name if expected is not None else None

    def missing_weights_message(self) -> str:
        """Why no weights were found and exactly how to provide them."""
        w = self.weights
        fname = self.weights_filename() or "the weights file"
        lines = [f"No weights for model '{self.name}' ({self.display_name}) on this machine."]
        cands = self.weights_candidates()
        if cands:
            lines.append("Looked for:")
            lines += [f"  - {c.describe()}" for c in cands]
        if w.hf_hub is not None:
            origin = f"the Hugging Face Hub ({w.hf_hub.page}, file {w.hf_hub.filename})"
        elif w.url:
            origin = w.url
        else:
            origin = "the model's authors"
        places = []
        expected = self.expected_path()
        if expected is not None:
            places.append(f"put it at {expected}")
        if w.env:
            places.append(f"set {w.env}=/path/to/{fname}")
        how = " or ".join(places) if places else "pass its path explicitly (weights=...)"
        lines.append(f"Get {fname} from {origin} and {how}.")
        if (w.hf_hub is not None or w.url) and w.default_path:
            lines.append(
                f"When online, `napari-gpfm models --download {self.name}` downloads it to "
                f"{Path(w.default_path).expanduser()}."
            )
        lines.append(f"Licence: {self.license}; napari-gpfm does not ship these weights.")
        if self.gated:
            page = w.hf_hub.page if w.hf_hub is not None else "the model page"
            lines.append(
                f"Access is gated: request it at {page}, then log in (`hf auth login`, or set "
                "HF_TOKEN) before downloading."
            )
        return "\n".join(lines)


# -- parsing helpers ---------------------------------------------------------------------------
class _Section:
    """One mapping of the card: typed access to keys and a final check for unknown keys."""

    def __init__(self, data: Any, where: str, path: Path | None):
        self.where, self.path = where, path
        if not isinstance(data, Mapping):
            what = f"'{where}'" if where else "the card"
            raise self.error(f"{what} must be a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.seen: set[str] = set()

    def error(self, problem: str) -> ModelCardError:
        return ModelCardError(self.path, problem)

    def key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], *, default: Any = _REQUIRED) -> Any:
        """The value of ``key`` checked against ``kind``; null/absent gives ``default``."""
        self.seen.add(key)
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.error(f"missing required key '{self.key(key)}'")
            return default
        if not _is_kind(value, kind):
            hint = ""
            if _is_kind(1.0, kind) and isinstance(value, str) and _parses_as_float(value):
                hint = " (YAML reads numbers like 1e-5 as text: write 1.0e-5)"
            raise self.error(f"'{self.key(key)}' must be {_kind_name(kind)}, got {value!r}{hint}")
        return float(value) if kind is float else value

    def section(self, key: str, required: bool = True) -> _Section | None:
        self.seen.add(key)
        value = self.data.get(key)
        if value is None and not required:
            return None
        if value is None:
            raise self.error(f"missing required section '{self.key(key)}'")
        return _Section(value, self.key(key), self.path)

    def close(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            names = ", ".join(repr(self.key(k)) for k in unknown)
            allowed = ", ".join(sorted(self.seen))
            raise self.error(f"unknown key(s) {names} (allowed here: {allowed})")


def _is_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # YAML true/false is never a number
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             Mapping: "a mapping", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _parse_architecture(sec: _Section) -> Architecture:
    pool_sec = sec.section("pool", required=False)
    arch = Architecture(
        timm_name=sec.get("timm_name", str),
        kwargs=dict(sec.get("kwargs", Mapping, default={})),
        norm_eps=sec.get("norm_eps", float, default=None),
        pool=_parse_pool(pool_sec) if pool_sec is not None else None,
    )
    sec.close()
    return arch


def _parse_pool(sec: _Section) -> PoolSpec:
    pool = PoolSpec(
        type=sec.get("type", str),
        dim=sec.get("dim", int),
        heads=sec.get("heads", int, default=8),
        project=sec.get("project", bool, default=True),
        normalize=sec.get("normalize", bool, default=False),
    )
    if pool.type not in POOL_TYPES:
        raise sec.error(
            f"'{sec.key('type')}' must be one of {', '.join(POOL_TYPES)}, got {pool.type!r}"
        )
    sec.close()
    return pool


def _parse_input(sec: _Section) -> InputSpec:
    size = sec.get("size", int)
    interpolation = sec.get("interpolation", str, default="bicubic")
    if interpolation not in INTERPOLATIONS:
        raise sec.error(f"'input.interpolation' must be one of {', '.join(INTERPOLATIONS)}, "
                        f"got {interpolation!r}")
    mean = _triple(sec, "mean")
    std = _triple(sec, "std")
    if size <= 0 or min(std) <= 0:
        raise sec.error("'input.size' and every 'input.std' value must be positive")
    sec.close()
    return InputSpec(size, interpolation, mean, std)


def _triple(sec: _Section, key: str) -> tuple[float, float, float]:
    values = sec.get(key, list)
    if len(values) != 3 or not all(_is_kind(v, float) for v in values):
        raise sec.error(f"'{sec.key(key)}' must be a list of 3 numbers (R, G, B), got {values!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _parse_weights(sec: _Section) -> WeightsSpec:
    hub_sec = sec.section("hf_hub", required=False)
    hub = None
    if hub_sec is not None:
        hub = HubFile(hub_sec.get("repo_id", str), hub_sec.get("filename", str),
                      hub_sec.get("revision", str, default=None))
        hub_sec.close()
    sha = sec.get("sha256", str, default=None)
    if sha is not None and not _SHA256_RE.match(sha.lower()):
        raise sec.error(f"'weights.sha256' must be 64 hexadecimal digits, got {sha!r}")
    spec = WeightsSpec(
        file=sec.get("file", str, default=None),
        env=sec.get("env", str, default=None),
        default_path=sec.get("default_path", str, default=None),
        hf_hub=hub,
        url=sec.get("url", str, default=None),
        sha256=sha.lower() if sha else None,
    )
    sec.close()
    return spec


def _parse_tiles(sec: _Section | None) -> TileRecommendation | None:
    if sec is None:
        return None
    tiles = TileRecommendation(sec.get("target_mpp", float), sec.get("patch_size", int))
    sec.close()
    return tiles
