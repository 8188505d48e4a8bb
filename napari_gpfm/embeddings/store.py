"""TRIDENT-compatible HDF5 feature files: a resumable writer and a checking reader.

Layout of ``<out>/features_<model>/<slide>.h5`` (one self-contained file per slide and model):

- dataset ``features`` (N, D) float32, attrs ``encoder`` (model name), ``name`` (slide name);
- dataset ``coords`` (N, 2) int64, level-0 top-left ``x, y`` in row-major scan order, with the
  TRIDENT attrs ``patch_size`` (px at the target mpp), ``patch_size_level0``,
  ``level0_magnification`` and ``target_magnification`` (exact, ``10 / mpp``), ``overlap``,
  ``name``, ``level0_width``, ``level0_height`` (mirrored on the file root);
- dataset ``tissue_fraction`` (N,) float32;
- root attrs ``gpfm_model``, ``gpfm_weights_sha256``, ``gpfm_mpp``, ``gpfm_mpp_source``,
  ``gpfm_target_mpp``, ``gpfm_input_size``, ``gpfm_recipe`` (JSON), ``gpfm_recipe_key``,
  ``gpfm_tissue_params`` (JSON), ``gpfm_version``, ``gpfm_n_total``, ``gpfm_n_done`` and
  ``gpfm_complete`` (set last).

While a slide is being embedded the file lives next to its final name as ``<slide>.h5.partial``
(so tools globbing ``*.h5`` never pick up a half-written file). All coords are written up front,
features are written chunk by chunk into a preallocated dataset and ``gpfm_n_done`` is flushed
after each chunk; a killed run resumes at ``gpfm_n_done``. When the last chunk is in,
``gpfm_complete`` is set and the file is renamed to ``<slide>.h5``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .recipe import EmbeddingRecipe, format_diff

__all__ = [
    "ExternalFeaturesWarning",
    "FeatureStore",
    "IncompleteStoreError",
    "RecipeMismatchError",
    "StoreError",
    "StoreWriter",
    "open_store",
    "partial_path",
    "store_path",
]

PARTIAL_SUFFIX = ".partial"
TRIDENT_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "level0_width",
    "level0_height",
)


class StoreError(Exception):
    """A feature file is missing, unreadable or unusable; the message names the file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class IncompleteStoreError(StoreError):
    """The feature file belongs to a run that has not finished (or was interrupted)."""


class RecipeMismatchError(StoreError):
    """The feature file was made with another recipe than the one expected."""

    def __init__(self, path: str | Path, diff: dict[str, tuple[Any, Any]]) -> None:
        self.diff = diff
        super().__init__(
            path,
            "made with a different recipe than expected (" + format_diff(diff) + "). "
            "Re-embed with --overwrite, or point to another output folder.",
        )


class ExternalFeaturesWarning(UserWarning):
    """Features from another tool: their recipe (model, mpp, tiling) cannot be checked."""


def safe_name(name: str) -> str:
    """File-system-safe version of a model or slide name."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("._")
    return cleaned or "unnamed"


def store_path(out_dir: str | Path, model: str, slide_name: str) -> Path:
    """``<out_dir>/features_<model>/<slide_name>.h5``."""
    return Path(out_dir) / f"features_{safe_name(model)}" / f"{slide_name}.h5"


def partial_path(path: str | Path) -> Path:
    """Where the unfinished version of ``path`` lives (``<slide>.h5.partial``)."""
    p = Path(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def _attr(v: Any) -> Any:
    """Value storable as an HDF5 attribute (None → empty string)."""
    return "" if v is None else v


def _locked(path: Path) -> StoreError:
    return StoreError(
        path,
        "locked by another process (is another embed run writing this slide, or a worker "
        "process of a killed run still alive?); wait for it to finish or stop it",
    )


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class StoreWriter:
    """Writes one slide's features chunk by chunk into ``<final>.partial`` (see module doc).

    Use :meth:`create` or :meth:`resume`, then :meth:`write` per chunk, then :meth:`finish`.
    :meth:`close` (also via ``with``) flushes and leaves a resumable partial file.
    """

    def __init__(self, final_path: Path, h5: h5py.File) -> None:
        self.final_path = Path(final_path)
        self.path = Path(h5.filename)
        self._h5: h5py.File | None = h5

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        final_path: str | Path,
        *,
        recipe: EmbeddingRecipe,
        coords: np.ndarray,
        embed_dim: int,
        slide_name: str,
        level0_width: int,
        level0_height: int,
        tissue_fraction: np.ndarray | None = None,
    ) -> StoreWriter:
        """Start a new partial file (replacing any previous one) with all coords written."""
        final_path = Path(final_path)
        final_path.parent.mkdir(parents=True, exist_ok=True)
        part = partial_path(final_path)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n = int(coords.shape[0])
        if n == 0:
            raise StoreError(final_path, "refusing to create a feature file with no patches")
        try:
            h5 = h5py.File(part, "w")
        except BlockingIOError as e:
            raise _locked(part) from e
        try:
            fds = h5.create_dataset("features", shape=(n, int(embed_dim)), dtype=np.float32)
            fds.attrs["encoder"] = recipe.model
            fds.attrs["name"] = slide_name
            cds = h5.create_dataset("coords", data=coords, dtype=np.int64)
            tf = np.ones(n, np.float32) if tissue_fraction is None else tissue_fraction
            h5.create_dataset("tissue_fraction", data=np.asarray(tf, dtype=np.float32))
            trident = {
                "patch_size": int(recipe.patch_size),
                "patch_size_level0": int(recipe.patch_size_level0),
                "level0_magnification": float(10.0 / recipe.mpp),
                "target_magnification": float(10.0 / recipe.target_mpp),
                "overlap": int(recipe.overlap),
                "name": slide_name,
                "level0_width": int(level0_width),
                "level0_height": int(level0_height),
            }
            for k, v in trident.items():
                cds.attrs[k] = v
                h5.attrs[k] = v
            ours = {
                "gpfm_model": recipe.model,
                "gpfm_weights_sha256": _attr(recipe.weights_sha256),
                "gpfm_mpp": float(recipe.mpp),
                "gpfm_mpp_source": _attr(recipe.mpp_source),
                "gpfm_target_mpp": float(recipe.target_mpp),
                "gpfm_input_size": int(recipe.input_size),
                "gpfm_recipe": recipe.to_json(),
                "gpfm_recipe_key": recipe.key(),
                "gpfm_tissue_params": json.dumps(recipe.tissue_params, sort_keys=True),
                "gpfm_version": recipe.versions.get("napari_gpfm", ""),
                "gpfm_n_total": n,
                "gpfm_n_done": 0,
                "gpfm_complete": False,
            }
            for k, v in ours.items():
                h5.attrs[k] = v
            h5.flush()
        except BaseException:
            h5.close()
            part.unlink(missing_ok=True)
            raise
        return cls(final_path, h5)

    @classmethod
    def resume(
        cls, final_path: str | Path, *, recipe: EmbeddingRecipe, coords: np.ndarray, embed_dim: int
    ) -> StoreWriter | None:
        """Reopen ``<final>.partial`` if it holds the same recipe, coords and dim, else ``None``.

        An unreadable partial file (e.g. killed in the middle of a write) also gives ``None``;
        the caller then starts afresh.
        """
        part = partial_path(final_path)
        if not part.exists():
            return None
        try:
            h5 = h5py.File(part, "r+")
        except BlockingIOError as e:
            raise _locked(part) from e
        except OSError:
            return None
        try:
            a = h5.attrs
            ok = (
                a.get("gpfm_recipe_key") == recipe.key()
                and "features" in h5
                and "coords" in h5
                and h5["features"].shape == (len(coords), int(embed_dim))
                and np.array_equal(h5["coords"][()], np.asarray(coords, dtype=np.int64))
                and 0 <= int(a.get("gpfm_n_done", -1)) <= len(coords)
            )
        except Exception:
            ok = False
        if not ok:
            h5.close()
            return None
        return cls(Path(final_path), h5)

    def reopen(self) -> StoreWriter:
        """Reopen a :meth:`close`-d writer (e.g. after starting loader worker processes)."""
        if self._h5 is None:
            try:
                self._h5 = h5py.File(self.path, "r+")
            except BlockingIOError as e:
                raise _locked(self.path) from e
        return self

    # -- writing ------------------------------------------------------------------------------

    @property
    def h5(self) -> h5py.File:
        if self._h5 is None:
            raise StoreError(self.path, "writer is closed")
        return self._h5

    @property
    def n_total(self) -> int:
        return int(self.h5.attrs["gpfm_n_total"])

    @property
    def n_done(self) -> int:
        return int(self.h5.attrs["gpfm_n_done"])

    def write(self, features: np.ndarray) -> int:
        """Append a chunk at ``n_done``, flush, and return the new ``n_done``."""
        feats = np.asarray(features, dtype=np.float32)
        start = self.n_done
        stop = start + feats.shape[0]
        ds = self.h5["features"]
        if feats.ndim != 2 or feats.shape[1] != ds.shape[1]:
            raise StoreError(
                self.path, f"chunk shape {feats.shape} does not fit features {ds.shape}"
            )
        if stop > ds.shape[0]:
            raise StoreError(self.path, f"chunk ends at {stop}, beyond the {ds.shape[0]} patches")
        ds[start:stop] = feats
        self.h5.flush()  # features on disk before the counter says so
        self.h5.attrs["gpfm_n_done"] = stop
        self.h5.flush()
        return stop

    def finish(self) -> Path:
        """Mark complete (last attr written), close and move to the final name."""
        if self.n_done != self.n_total:
            raise IncompleteStoreError(
                self.path, f"cannot finish: {self.n_done} of {self.n_total} patches embedded"
            )
        self.h5.attrs["gpfm_complete"] = True
        self.h5.flush()
        self.close()
        os.replace(self.path, self.final_path)
        return self.final_path

    def close(self) -> None:
        """Flush and close; the partial file stays resumable."""
        if self._h5 is not None:
            try:
                self._h5.flush()
            finally:
                self._h5.close()
                self._h5 = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureStore:
    """A feature file opened for reading: ours (``kind="gpfm"``) or another tool's.

    Attributes:
        path: the file.
        kind: ``"gpfm"``, ``"trident"`` (TRIDENT-style h5 without our attrs), ``"clam"``
            (CLAM ``h5_files/*.h5``) or ``"clam-pt"`` (CLAM ``pt_files/*.pt``).
        coords: (N, 2) int64 level-0 top-left x, y, or ``None`` (a ``.pt`` without its h5).
        attrs: root attrs merged with the ``coords`` attrs (TRIDENT stores them there).
        recipe: our recipe, ``None`` for external files (recipe unknown).
    """

    path: Path
    kind: str
    coords: np.ndarray | None
    attrs: dict[str, Any] = field(default_factory=dict)
    recipe: EmbeddingRecipe | None = None
    _features: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_external(self) -> bool:
        """True for files made by other tools: readable, but their recipe is unknown."""
        return self.kind != "gpfm"

    @property
    def features(self) -> np.ndarray:
        """(N, D) float32 features (read on first access)."""
        if self._features is None:
            with h5py.File(self.path, "r") as f:
                self._features = np.asarray(f["features"][()], dtype=np.float32)
        return self._features

    @property
    def n_patches(self) -> int:
        if self.coords is not None:
            return int(self.coords.shape[0])
        return int(self.features.shape[0])

    @property
    def embed_dim(self) -> int:
        if self._features is not None:
            return int(self._features.shape[1])
        with h5py.File(self.path, "r") as f:
            return int(f["features"].shape[1])

    @property
    def model(self) -> str | None:
        """Encoder name (ours, or TRIDENT's ``features.attrs['encoder']``), if recorded."""
        return self.attrs.get("gpfm_model") or self.attrs.get("encoder") or None

    @property
    def slide_name(self) -> str:
        name = self.attrs.get("name")
        return str(name) if name else self.path.name.split(".")[0]

    @property
    def patch_size_level0(self) -> int | None:
        v = self.attrs.get("patch_size_level0")
        return None if v is None else int(v)

    @property
    def mpp(self) -> float | None:
        """Level-0 µm/px used (ours), else derived from ``level0_magnification`` if present."""
        if "gpfm_mpp" in self.attrs:
            return float(self.attrs["gpfm_mpp"])
        mag = self.attrs.get("level0_magnification")
        return 10.0 / float(mag) if mag else None

    def describe(self) -> str:
        """One line for logs and the UI, flagging external files."""
        n = self.n_patches
        if self.is_external:
            return f"{self.path.name}: {n} patches, {self.kind} file (external: recipe unknown)"
        assert self.recipe is not None
        return (
            f"{self.path.name}: {n} patches, model {self.recipe.model}, "
            f"{self.recipe.patch_size} px at {self.recipe.target_mpp} µm/px, "
            f"key {self.recipe.key()}"
        )


def _h5_attrs(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _read_h5(path: Path, expected_recipe: EmbeddingRecipe | None) -> FeatureStore:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(path, f"not a readable HDF5 file ({e})") from e
    with f:
        if "features" not in f:
            raise StoreError(
                path, f"no 'features' dataset (found: {', '.join(f.keys()) or 'nothing'})"
            )
        attrs = _h5_attrs(f)
        coords = None
        if "coords" in f:
            for k, v in _h5_attrs(f["coords"]).items():
                attrs.setdefault(k, v)
            coords = np.asarray(f["coords"][()]).astype(np.int64).reshape(-1, 2)
        for k, v in _h5_attrs(f["features"]).items():
            attrs.setdefault(k, v)
        n_feat = f["features"].shape[0]

    if "gpfm_recipe_key" not in attrs:
        kind = "clam" if path.parent.name == "h5_files" else "trident"
        if coords is not None and coords.shape[0] != n_feat:
            raise StoreError(path, f"{n_feat} features but {coords.shape[0]} coords")
        if expected_recipe is not None:
            warnings.warn(
                f"{path}: {kind} feature file from another tool; its recipe (model, mpp, tiling) "
                "is unknown and cannot be checked against the expected one",
                ExternalFeaturesWarning,
                stacklevel=3,
            )
        return FeatureStore(path=path, kind=kind, coords=coords, attrs=attrs)

    if not bool(attrs.get("gpfm_complete", False)):
        raise IncompleteStoreError(
            path,
            f"incomplete feature file ({attrs.get('gpfm_n_done')} of {attrs.get('gpfm_n_total')} "
            "patches embedded); run `napari-gpfm embed` again on the slide to resume it",
        )
    try:
        recipe = EmbeddingRecipe.from_json(attrs["gpfm_recipe"])
    except Exception as e:
        raise StoreError(path, f"unreadable gpfm_recipe attribute ({e})") from e
    if expected_recipe is not None and recipe.key() != expected_recipe.key():
        raise RecipeMismatchError(path, recipe.diff(expected_recipe))
    return FeatureStore(path=path, kind="gpfm", coords=coords, attrs=attrs, recipe=recipe)


def _read_pt(path: Path) -> FeatureStore:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoreError(path, f"not a loadable tensor file ({e})") from e
    if isinstance(obj, dict) and "features" in obj:
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2:
        raise StoreError(path, "expected a 2-D (N, D) feature tensor")
    feats = obj.detach().to(torch.float32).numpy()
    coords = None
    attrs: dict[str, Any] = {}
    sibling = path.parent.parent / "h5_files" / (path.stem + ".h5")
    if sibling.exists():
        h5 = _read_h5(sibling, None)
        if h5.coords is not None and h5.coords.shape[0] == feats.shape[0]:
            coords, attrs = h5.coords, h5.attrs
    return FeatureStore(path=path, kind="clam-pt", coords=coords, attrs=attrs, _features=feats)


def open_store(path: str | Path, expected_recipe: EmbeddingRecipe | None = None) -> FeatureStore:
    """Open a feature file for reading, refusing ones that cannot be trusted.

    Accepts our files, TRIDENT files, CLAM ``h5_files/*.h5`` and ``pt_files/*.pt``.
    Raises :class:`IncompleteStoreError` for an unfinished run (including when only
    ``<path>.partial`` exists), :class:`RecipeMismatchError` (listing the differing fields) when
    ``expected_recipe`` is given and differs, and :class:`StoreError` for unreadable files.
    External files open with ``recipe=None``; with ``expected_recipe`` they also warn
    (:class:`ExternalFeaturesWarning`).
    """
    path = Path(path)
    if not path.exists():
        part = partial_path(path)
        if part.exists():
            raise IncompleteStoreError(
                path,
                f"not finished yet: only the unfinished {part.name} exists; run "
                "`napari-gpfm embed` again on the slide to resume it",
            )
        raise StoreError(path, "no such feature file")
    if path.suffix == ".pt":
        return _read_pt(path)
    return _read_h5(path, expected_recipe)
