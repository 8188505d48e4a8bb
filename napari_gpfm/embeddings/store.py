"""TRIDENT-compatible HDF5 feature files: a resumable writer and a checking reader.

Layout of ``<out>/<tiling>/features_<model>/<slide>.h5`` (one self-contained file per slide,
tiling and model; TRIDENT's job-folder layout). ``<tiling>`` is :func:`tiling_dir_name`, e.g.
``0.5mpp_224px_0px_overlap``, so stores of several tilings live side by side; ``<slide>`` is
:attr:`Slide.name <napari_gpfm.slide.Slide>` (the file name without its last extension).

- dataset ``features`` (N, D) float32, attrs ``encoder`` (model name), ``name`` (slide name);
- dataset ``coords`` (N, 2) int64, level-0 top-left ``x, y`` in row-major scan order, with the
  TRIDENT attrs ``patch_size`` (px at the target mpp), ``patch_size_level0``,
  ``level0_magnification`` and ``target_magnification`` (exact, ``10 / mpp``), ``overlap``,
  ``name``, ``level0_width``, ``level0_height`` (mirrored on the file root);
- dataset ``tissue_fraction`` (N,) float32;
- root attrs ``gpfm_model``, ``gpfm_weights_sha256``, ``gpfm_mpp``, ``gpfm_mpp_source``,
  ``gpfm_target_mpp``, ``gpfm_input_size``, ``gpfm_recipe`` (JSON), ``gpfm_recipe_key``,
  ``gpfm_tissue_params`` (JSON), ``gpfm_version``, ``gpfm_slide_fingerprint`` (JSON of
  :class:`~napari_gpfm.slide.SlideFingerprint`), ``gpfm_slide_path`` (absolute path of the slide
  at write time), ``gpfm_n_total``, ``gpfm_n_done`` and ``gpfm_complete`` (set last).

Slide identity: two different files can have the same name (``X.svs`` in two folders, a file
replaced by another). The writer records the slide's fingerprint; resuming a ``.partial``,
reusing a finished store (``embed_slide``) and :func:`open_store` with ``expected_slide`` refuse a
store of another file with :class:`SlideMismatchError`. Stores written before fingerprints
existed are compared by their recorded ``level0_width``/``level0_height`` only.

While a slide is being embedded the file lives next to its final name as ``<slide>.h5.partial``
(so tools globbing ``*.h5`` never pick up a half-written file). All coords are written up front,
features are written chunk by chunk into a preallocated dataset and ``gpfm_n_done`` is flushed
after each chunk; a killed run resumes at ``gpfm_n_done``. When the last chunk is in,
``gpfm_complete`` is set and the file is renamed to ``<slide>.h5``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from napari_gpfm.errors import NapariGpfmError
from napari_gpfm.slide.identity import SlideFingerprint, slide_fingerprint

from .recipe import EmbeddingRecipe, format_diff

__all__ = [
    "ExternalFeaturesWarning",
    "FeatureStore",
    "IncompleteStoreError",
    "InferredPatchSizeWarning",
    "RecipeMismatchError",
    "SlideMismatchError",
    "StoreError",
    "StoreWriter",
    "check_slide",
    "find_store",
    "open_store",
    "partial_path",
    "recipe_store_path",
    "store_path",
    "tiling_dir_name",
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


class StoreError(NapariGpfmError):
    """A feature file is missing, unreadable or unusable; the message names the file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class IncompleteStoreError(StoreError):
    """The feature file belongs to a run that has not finished (or was interrupted)."""


class RecipeMismatchError(StoreError, ValueError):
    """Features were made with another embedding recipe than the one expected: a feature file
    refused by :func:`open_store` / :func:`find_store`, or a classifier (linear probe) refused
    for features of another recipe (``napari_gpfm.analyses.probe`` re-exports this class).

    Attributes:
        path: the file refused (feature file or classifier file).
        diff: ``{recipe key: (found value, expected value)}``, from
            :func:`~napari_gpfm.embeddings.recipe.recipe_diff`.
    """

    def __init__(
        self, path: str | Path, diff: dict[str, tuple[Any, Any]], problem: str | None = None
    ) -> None:
        self.diff = dict(diff)
        if problem is None:
            problem = (
                "made with a different recipe than expected (" + format_diff(self.diff) + "). "
                "Re-embed with --overwrite, or point to another output folder."
            )
        super().__init__(path, problem)


class SlideMismatchError(StoreError):
    """The feature file was computed from another slide file than the one given (same name).

    Attributes:
        recorded: description of the slide the features were computed from.
        current: description of the slide given now.
        recorded_fingerprint: its fingerprint, ``None`` for stores that predate fingerprints.
        current_fingerprint: the given slide's fingerprint.
    """

    def __init__(
        self,
        path: str | Path,
        recorded: str,
        current: SlideFingerprint,
        recorded_fingerprint: SlideFingerprint | None = None,
        same_path: bool = False,
    ) -> None:
        self.recorded = recorded
        self.current = current.describe()
        self.recorded_fingerprint = recorded_fingerprint
        self.current_fingerprint = current
        what = (
            "a different file at the same path (was the slide replaced?)"
            if same_path
            else "a different slide with the same name"
        )
        super().__init__(
            path,
            f"these features were computed from {recorded} but the slide now is "
            f"{self.current}, {what}. Choose another output folder, or overwrite "
            "(--overwrite) to replace them.",
        )


class ExternalFeaturesWarning(UserWarning):
    """Features from another tool: their recipe (model, mpp, tiling) cannot be checked."""


class InferredPatchSizeWarning(ExternalFeaturesWarning):
    """A feature file records no patch size; it was inferred from its coordinate grid."""


def safe_name(name: str) -> str:
    """File-system-safe version of a model or slide name."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("._")
    return cleaned or "unnamed"


def tiling_dir_name(target_mpp: float, patch_size: int, overlap: int = 0) -> str:
    """The tiling's folder (TRIDENT-style): ``0.5mpp_224px_0px_overlap``."""
    return f"{float(target_mpp):g}mpp_{int(patch_size)}px_{int(overlap)}px_overlap"


def store_path(out_dir: str | Path, model: str, slide_name: str, tiling: str) -> Path:
    """``<out_dir>/<tiling>/features_<model>/<slide_name>.h5``; ``tiling`` from
    :func:`tiling_dir_name`."""
    return Path(out_dir) / tiling / f"features_{safe_name(model)}" / f"{slide_name}.h5"


def recipe_store_path(out_dir: str | Path, recipe: EmbeddingRecipe, slide_name: str) -> Path:
    """Where the store of ``slide_name`` under ``recipe`` lives in ``out_dir``."""
    tiling = tiling_dir_name(recipe.target_mpp, recipe.patch_size, recipe.overlap)
    return store_path(out_dir, recipe.model, slide_name, tiling)


def partial_path(path: str | Path) -> Path:
    """Where the unfinished version of ``path`` lives (``<slide>.h5.partial``)."""
    p = Path(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def _attr(v: Any) -> Any:
    """Value storable as an HDF5 attribute (None → empty string)."""
    return "" if v is None else v


def _as_fingerprint(slide: Any) -> SlideFingerprint:
    return slide if isinstance(slide, SlideFingerprint) else slide_fingerprint(slide)


def _decoded(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def check_slide(path: str | Path, attrs: Any, expected: Any) -> None:
    """Raise :class:`SlideMismatchError` unless the store whose attrs are ``attrs`` was computed
    from ``expected`` (a Slide or :class:`SlideFingerprint`).

    With a recorded fingerprint the files are compared (size, dimensions, digest); without one
    (older stores, other tools' files) the recorded ``level0_width``/``level0_height`` are;
    a store recording neither is accepted.
    """
    current = _as_fingerprint(expected)
    recorded_json = _decoded(attrs.get("gpfm_slide_fingerprint", ""))
    recorded_path = str(_decoded(attrs.get("gpfm_slide_path", "")) or "")
    if recorded_json:
        try:
            recorded = SlideFingerprint.from_json(recorded_json)
        except ValueError as e:
            raise StoreError(path, f"unreadable gpfm_slide_fingerprint attribute ({e})") from e
        if recorded.matches(current):
            return
        if recorded_path and not recorded.path:
            recorded = dataclasses.replace(recorded, path=recorded_path)
        raise SlideMismatchError(
            path, recorded.describe(), current, recorded, same_path=recorded.path == current.path
        )
    w, h = attrs.get("level0_width"), attrs.get("level0_height")
    if w is None or h is None or (int(w), int(h)) == (current.width, current.height):
        return
    where = recorded_path or "a slide"
    raise SlideMismatchError(
        path,
        f"{where} ({int(w)}×{int(h)} px; the feature file records no slide fingerprint)",
        current,
        same_path=bool(recorded_path) and recorded_path == current.path,
    )


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
        slide_fingerprint: SlideFingerprint | None = None,
    ) -> StoreWriter:
        """Start a new partial file (replacing any previous one) with all coords written.

        ``slide_fingerprint`` (from :func:`napari_gpfm.slide.slide_fingerprint`) is recorded with
        the slide's path, so that later runs and readers can tell another file of the same
        name apart.
        """
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
            if slide_fingerprint is not None:
                ours["gpfm_slide_fingerprint"] = slide_fingerprint.to_json()
                ours["gpfm_slide_path"] = slide_fingerprint.path
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
        cls,
        final_path: str | Path,
        *,
        recipe: EmbeddingRecipe,
        coords: np.ndarray,
        embed_dim: int,
        slide_fingerprint: SlideFingerprint | None = None,
    ) -> StoreWriter | None:
        """Reopen ``<final>.partial`` if it holds the same recipe, coords and dim, else ``None``.

        An unreadable partial file (e.g. killed in the middle of a write) also gives ``None``;
        the caller then starts afresh.

        Raises:
            SlideMismatchError: ``slide_fingerprint`` is given and the partial file was started
                from another slide file (whatever its recipe): its rows must not be mixed with
                this slide's, and it is not silently thrown away either.
        """
        part = partial_path(final_path)
        if not part.exists():
            return None
        if slide_fingerprint is not None:  # checked read-only: a refused file stays untouched
            try:
                with h5py.File(part, "r") as ro:
                    check_slide(part, ro.attrs, slide_fingerprint)
            except SlideMismatchError:
                raise
            except BlockingIOError as e:
                raise _locked(part) from e
            except Exception:  # unreadable file or attributes: unusable, start afresh
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
        patch_size_source: where :attr:`patch_size_level0` comes from: ``"file"`` (recorded),
            ``"user"`` (given to :func:`open_store`), ``"inferred from the coordinate grid"``
            (CLAM files record none), or ``None`` (unknown: no coords, or not inferable).
    """

    path: Path
    kind: str
    coords: np.ndarray | None
    attrs: dict[str, Any] = field(default_factory=dict)
    recipe: EmbeddingRecipe | None = None
    _features: np.ndarray | None = field(default=None, repr=False)
    patch_size_source: str | None = None
    _patch_size: int | None = field(default=None, repr=False)
    _patch_size_problem: str | None = field(default=None, repr=False)

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
        return str(name) if name else os.path.splitext(self.path.name)[0]

    @property
    def slide_fingerprint(self) -> SlideFingerprint | None:
        """The fingerprint of the slide the features were computed from (``None`` when the
        file records none: older stores, other tools)."""
        text = self.attrs.get("gpfm_slide_fingerprint")
        if not text:
            return None
        try:
            return SlideFingerprint.from_json(text)
        except ValueError:
            return None

    @property
    def slide_path(self) -> str | None:
        """Absolute path of the slide when the features were written, if recorded."""
        return self.attrs.get("gpfm_slide_path") or None

    @property
    def patch_size_level0(self) -> int | None:
        """Patch side in level-0 px: recorded, given, or inferred (see ``patch_size_source``);
        ``None`` without coords.

        Raises:
            StoreError: the file records none and its coordinate grid does not tell it (one
                patch; x and y strides differ): the message says so and how to give it.
        """
        if self._patch_size is not None:
            return self._patch_size
        v = self.attrs.get("patch_size_level0")
        if v is None and self._patch_size_problem:
            raise StoreError(self.path, self._patch_size_problem)
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
    return {k: _decoded(v) for k, v in obj.attrs.items()}


PATCH_SIZE_FILE = "file"
PATCH_SIZE_USER = "user"
PATCH_SIZE_INFERRED = "inferred from the coordinate grid"


def _grid_stride(values: np.ndarray) -> int | None:
    """The most common positive difference between the sorted unique values (None: one value)."""
    u = np.unique(values)
    if u.size < 2:
        return None
    steps, counts = np.unique(np.diff(u), return_counts=True)
    return int(steps[counts.argmax()])  # ties: the smallest


def infer_patch_size(coords: np.ndarray, path: str | Path) -> int:
    """Level-0 patch side of a grid of patches that do not overlap: its stride.

    The stride is the most common positive difference between the sorted unique x's (and the
    same for y). Raises :class:`StoreError` when x and y strides differ or there is only one
    patch position.
    """
    c = np.asarray(coords).reshape(-1, 2)
    sx, sy = _grid_stride(c[:, 0]), _grid_stride(c[:, 1])
    how = "give the patch size when opening it (open_store(..., patch_size_level0=...))"
    if sx is None and sy is None:
        raise StoreError(
            path,
            f"records no patch_size_level0 and has {'only one patch' if len(c) else 'no patches'}"
            f", so the patch size cannot be inferred from the coordinate grid; {how}",
        )
    if sx is not None and sy is not None and sx != sy:
        raise StoreError(
            path,
            f"records no patch_size_level0 and its coordinate grid has an x stride of {sx} px "
            f"but a y stride of {sy} px, so the patch size cannot be inferred; {how}",
        )
    return int(sx if sx is not None else sy)


def _resolve_patch_size(
    path: Path, attrs: dict[str, Any], coords: np.ndarray | None, given: int | None,
    coords_file: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """FeatureStore fields: the patch size to use when the file records none, where the patch
    size comes from, and why it cannot be inferred (raised when it is asked for)."""
    recorded = attrs.get("patch_size_level0")
    if recorded is not None and str(recorded) != "":
        if given is not None and int(given) != int(recorded):
            raise StoreError(
                path,
                f"records patch_size_level0 = {int(recorded)} px but {int(given)} px was given",
            )
        return {"patch_size_source": PATCH_SIZE_FILE}
    if given is not None:
        if int(given) <= 0:
            raise StoreError(path, f"patch_size_level0 must be positive, got {given}")
        return {"_patch_size": int(given), "patch_size_source": PATCH_SIZE_USER}
    if coords is None:
        return {}
    where = "" if coords_file in (None, path) else f" (coordinates from {coords_file})"
    try:
        size = infer_patch_size(coords, path)
    except StoreError as e:  # the features stay readable; asking for the patch size raises
        problem = e.problem.replace("patch_size_level0", "patch_size_level0" + where, 1)
        return {"_patch_size_problem": problem}
    warnings.warn(
        f"{path}: the file records no patch_size_level0; inferred {size} px from the "
        f"coordinate grid{where}, assuming patches that touch without overlapping. Pass "
        "patch_size_level0 to open_store if that is wrong.",
        InferredPatchSizeWarning,
        stacklevel=4,
    )
    return {"_patch_size": size, "patch_size_source": PATCH_SIZE_INFERRED}


def _read_coords(f: h5py.File) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(coords (N, 2) int64 or None, root attrs merged with the coords attrs) of an open file."""
    attrs = _h5_attrs(f)
    coords = None
    if "coords" in f:
        for k, v in _h5_attrs(f["coords"]).items():
            attrs.setdefault(k, v)
        coords = np.asarray(f["coords"][()]).astype(np.int64).reshape(-1, 2)
    return coords, attrs


def _read_h5(
    path: Path,
    expected_recipe: EmbeddingRecipe | None,
    expected_slide: Any = None,
    patch_size_level0: int | None = None,
) -> FeatureStore:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(path, f"not a readable HDF5 file ({e})") from e
    with f:
        if "features" not in f:
            raise StoreError(
                path, f"no 'features' dataset (found: {', '.join(f.keys()) or 'nothing'})"
            )
        coords, attrs = _read_coords(f)
        for k, v in _h5_attrs(f["features"]).items():
            attrs.setdefault(k, v)
        n_feat = f["features"].shape[0]

    if "gpfm_recipe_key" not in attrs:
        kind = "clam" if path.parent.name == "h5_files" else "trident"
        if coords is not None and coords.shape[0] != n_feat:
            raise StoreError(path, f"{n_feat} features but {coords.shape[0]} coords")
        if expected_slide is not None:
            check_slide(path, attrs, expected_slide)
        if expected_recipe is not None:
            warnings.warn(
                f"{path}: {kind} feature file from another tool; its recipe (model, mpp, tiling) "
                "is unknown and cannot be checked against the expected one",
                ExternalFeaturesWarning,
                stacklevel=3,
            )
        size = _resolve_patch_size(path, attrs, coords, patch_size_level0)
        return FeatureStore(path=path, kind=kind, coords=coords, attrs=attrs, **size)

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
    if expected_slide is not None:
        check_slide(path, attrs, expected_slide)
    if expected_recipe is not None and recipe.key() != expected_recipe.key():
        raise RecipeMismatchError(path, recipe.diff(expected_recipe))
    size = _resolve_patch_size(path, attrs, coords, patch_size_level0)
    return FeatureStore(path=path, kind="gpfm", coords=coords, attrs=attrs, recipe=recipe, **size)


def _numpy_safe_globals() -> list:
    """Exactly what unpickling a numpy float array needs (numpy 1.x and 2.x pickles): the array
    reconstructor, ``ndarray``, ``dtype`` and the float dtype classes. Nothing that can run code:
    an object array's elements still need their own globals, which stay refused."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed: list = [
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
    ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    for name in ("Float16DType", "Float32DType", "Float64DType"):
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append((getattr(dtypes, name), f"numpy.dtypes.{name}"))
    return allowed


def _safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` that also accepts a pickled numpy float array (TRIDENT
    writes its ``.pt`` features that way); the extra globals are allowed for this call only."""
    import torch

    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    allow = contextlib.nullcontext() if scoped is None else scoped(_numpy_safe_globals())
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        m = (
            re.search(r"(?i)unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", text)
            or re.search(r"but got <class '([\w.]+)'>", text)
            or re.search(r"Unsupported operand (\S+)", text)
        )
        if m:
            old = " (numpy arrays need torch >= 2.5)" if scoped is None else ""
            raise StoreError(
                path,
                f"refused by the safe loader: the file needs {m.group(1)}, which is not allowed "
                f"(a feature .pt may hold only tensors or numpy float arrays{old}); a file that "
                "needs more can run code when loaded, so it is not opened",
            ) from e
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise StoreError(path, f"not a loadable tensor file ({first})") from e


def _pt_coords(path: Path) -> tuple[Path | None, np.ndarray | None, dict[str, Any]]:
    """Coordinates of a ``.pt`` feature file from its siblings: CLAM's ``../h5_files/<stem>.h5``
    or TRIDENT's ``../patches/<stem>_patches.h5``."""
    for sibling in (
        path.parent.parent / "h5_files" / (path.stem + ".h5"),
        path.parent.parent / "patches" / (path.stem + "_patches.h5"),
    ):
        if not sibling.exists():
            continue
        try:
            with h5py.File(sibling, "r") as f:
                coords, attrs = _read_coords(f)
        except OSError:
            continue
        if coords is not None:
            return sibling, coords, attrs
    return None, None, {}


def _read_pt(
    path: Path, expected_slide: Any = None, patch_size_level0: int | None = None
) -> FeatureStore:
    import torch

    obj = _safe_torch_load(path)
    if isinstance(obj, dict) and "features" in obj:
        obj = obj["features"]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind != "f":
            raise StoreError(path, f"expected float features, got a {obj.dtype} array")
        kind, feats = "trident-pt", np.asarray(obj, dtype=np.float32)
    elif isinstance(obj, torch.Tensor):
        kind, feats = "clam-pt", obj.detach().to(torch.float32).numpy()
    else:
        raise StoreError(path, f"expected a 2-D (N, D) feature tensor, got {type(obj).__name__}")
    if feats.ndim != 2:
        raise StoreError(path, f"expected a 2-D (N, D) feature tensor, got shape {feats.shape}")
    coords = None
    attrs: dict[str, Any] = {}
    sibling, c, a = _pt_coords(path)
    if c is not None and c.shape[0] == feats.shape[0]:
        coords, attrs = c, a
    if expected_slide is not None:
        check_slide(path, attrs, expected_slide)
    size = _resolve_patch_size(path, attrs, coords, patch_size_level0, sibling)
    return FeatureStore(path=path, kind=kind, coords=coords, attrs=attrs, _features=feats, **size)


def open_store(
    path: str | Path,
    expected_recipe: EmbeddingRecipe | None = None,
    *,
    expected_slide: Any = None,
    patch_size_level0: int | None = None,
) -> FeatureStore:
    """Open a feature file for reading, refusing ones that cannot be trusted.

    Accepts our files, TRIDENT files (``.h5``, and ``.pt`` holding a numpy array, with coords
    from ``../patches/<slide>_patches.h5``), CLAM ``h5_files/*.h5`` and ``pt_files/*.pt``, at any
    path. ``.pt`` files are loaded with ``weights_only=True``; only tensors and numpy float
    arrays are allowed in them.

    Patch size: a file that records no ``patch_size_level0`` (CLAM) takes ``patch_size_level0``
    when given, else it is inferred from the grid stride of its coords with an
    :class:`InferredPatchSizeWarning` naming the file and the value
    (``store.patch_size_source`` says which). When it cannot be inferred (one patch; x and y
    strides differ) the file still opens and ``store.patch_size_level0`` raises
    :class:`StoreError` saying so; a given value that contradicts the recorded one is refused
    here.

    Raises :class:`IncompleteStoreError` for an unfinished run (including when only
    ``<path>.partial`` exists), :class:`SlideMismatchError` when ``expected_slide`` (a
    :class:`~napari_gpfm.slide.Slide` or :class:`~napari_gpfm.slide.SlideFingerprint`) is given
    and the features were computed from another file (see :func:`check_slide`),
    :class:`RecipeMismatchError` (listing the differing fields) when ``expected_recipe`` is given
    and differs, and :class:`StoreError` for unreadable files. External files open with
    ``recipe=None``; with ``expected_recipe`` they also warn (:class:`ExternalFeaturesWarning`).
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
        return _read_pt(path, expected_slide, patch_size_level0)
    return _read_h5(path, expected_recipe, expected_slide, patch_size_level0)


def find_store(out_dir: str | Path, slide: Any, recipe: EmbeddingRecipe) -> FeatureStore | None:
    """The finished store of ``slide`` under ``recipe`` in ``out_dir``, or ``None`` if there is
    none yet (nothing, or only an unfinished ``.partial``, at :func:`recipe_store_path`).

    Never returns a wrong store: raises :class:`SlideMismatchError` when the store there was
    computed from another file of the same name, :class:`RecipeMismatchError` when it has another
    recipe (same tiling, other model weights or tissue settings), and :class:`StoreError` when the
    file there is unreadable or was not written by napari-gpfm (recipe unknown).
    """
    path = recipe_store_path(out_dir, recipe, slide.name)
    if not path.exists():
        return None
    store = open_store(path, expected_slide=slide)
    if store.is_external:
        raise StoreError(
            path,
            f"already exists and was not written by napari-gpfm ({store.kind} file); "
            "use --overwrite (overwrite=True) to replace it or choose another output folder",
        )
    assert store.recipe is not None
    if store.recipe.key() != recipe.key():
        raise RecipeMismatchError(path, store.recipe.diff(recipe))
    return store
