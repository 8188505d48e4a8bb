"""Exact-mpp patch grids.

A :class:`GridSpec` says what one patch *is* physically: a square field of ``patch_size`` pixels
at ``target_mpp`` µm/px (so ``patch_size · target_mpp`` µm wide), handed to the model at
``input_size`` pixels. The two sizes are kept apart on purpose: GPFM's authors read 512 px at
0.25 µm/px (a 128 µm field) and resize to 224, while TRIDENT reads 224 px at 0.5 µm/px (112 µm).

:func:`make_grid` turns a spec into level-0 coordinates using the slide's *exact* mpp (no
rounding to 20×/40× buckets): ``patch_size_level0 = round(patch_size · target_mpp / slide_mpp)``.
Magnification, where needed, is the convention ``magnification = 10 / mpp`` (0.5 µm/px ≙ 20×).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from napari_gpfm.errors import NapariGpfmError
from napari_gpfm.slide.errors import MissingMppError

from .tissue import TissueMask

__all__ = [
    "DEFAULT_MAX_PATCHES",
    "GridSpec",
    "PRESETS",
    "TileGrid",
    "TooManyPatchesError",
    "best_level",
    "get_preset",
    "make_grid",
    "mpp_to_magnification",
    "magnification_to_mpp",
]

#: Microns per pixel of a 1× scan under the usual convention (10 µm/px at 1×, 0.5 at 20×).
MPP_AT_1X = 10.0

#: A slide grid larger than this asks for confirmation (``make_grid(max_patches=...)``, the
#: CLI's ``--max-patches``): a 100k x 100k px scan at 0.25 µm/px cut into 224 px patches at
#: 0.5 µm/px gives about 50,000; two million means a wrong pixel size or spec.
DEFAULT_MAX_PATCHES = 2_000_000
# Candidate positions evaluated per block (bounds memory on huge grids).
_GRID_BLOCK = 1_000_000


class TooManyPatchesError(NapariGpfmError, ValueError):
    """The grid would hold more patches than ``max_patches``: most likely a wrong pixel size or
    patch spec; the message names the slide and the numbers and says how to confirm."""


def magnification_to_mpp(magnification: float) -> float:
    """``10 / magnification`` µm/px (20× → 0.5, 40× → 0.25)."""
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    return MPP_AT_1X / float(magnification)


def mpp_to_magnification(mpp: float) -> float:
    """``10 / mpp`` (0.5 µm/px → 20×); the exact value, not a bucket."""
    return MPP_AT_1X / float(mpp)


@dataclass(frozen=True)
class GridSpec:
    """Physical definition of the patches to cut.

    Attributes:
        target_mpp: µm/px at which the field is defined (0.5 ≙ 20×).
        patch_size: field side in pixels *at target_mpp* (TRIDENT's ``patch_size``).
        overlap: overlap between neighbours, pixels at target_mpp (stride = patch_size - overlap).
        min_tissue: minimum tissue fraction of a patch to keep it; 0 keeps every patch.
        input_size: side in pixels the patch is resampled to for the model when no encoder
            says otherwise. An encoder's own input size wins (the model is fed what it was
            trained on); with neither, ``patch_size`` is used.
        name: preset name, informational.
    """

    target_mpp: float = 0.5
    patch_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.5
    input_size: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ValueError(f"target_mpp must be positive, got {self.target_mpp}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if not 0 <= self.overlap < self.patch_size:
            raise ValueError(
                f"overlap must be in [0, patch_size={self.patch_size}), got {self.overlap}"
            )
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.input_size is not None and self.input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {self.input_size}")

    @property
    def stride(self) -> int:
        """Step between patches, pixels at target_mpp."""
        return self.patch_size - self.overlap

    @property
    def field_um(self) -> float:
        """Side of the field of view in µm."""
        return self.patch_size * self.target_mpp

    @property
    def target_magnification(self) -> float:
        """``10 / target_mpp``."""
        return mpp_to_magnification(self.target_mpp)

    def out_size(self, encoder_input: int | None = None) -> int:
        """Side handed to the model: the encoder's, else ``input_size``, else ``patch_size``."""
        return int(encoder_input or self.input_size or self.patch_size)

    def replace(self, **changes: Any) -> GridSpec:
        """Copy with some fields changed (``None`` values are ignored); drops the preset name."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        changes.setdefault("name", None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field."""
        return dataclasses.asdict(self)


PRESETS: dict[str, GridSpec] = {
    # TRIDENT's GPFM pairing: 224 px at 20× (0.5 µm/px), a 112 µm field, fed as is.
    "gpfm-20x-224": GridSpec(target_mpp=0.5, patch_size=224, input_size=224, name="gpfm-20x-224"),
    # GPFM authors: 512 px at 40× (0.25 µm/px), a 128 µm field, resized to 224 for the model.
    "gpfm-40x-512to224": GridSpec(
        target_mpp=0.25, patch_size=512, input_size=224, name="gpfm-40x-512to224"
    ),
}


def get_preset(name: str) -> GridSpec:
    """The preset ``name``; raises ``KeyError`` listing the known presets."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(PRESETS)
        raise KeyError(f"unknown tile preset {name!r}; known presets: {known}") from None


class _GridSlide(Protocol):
    path: Any
    mpp: float | None
    mpp_source: str | None
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]


@dataclass
class TileGrid:
    """Patches to embed, in row-major scan order.

    Attributes:
        coords: (N, 2) int64 level-0 top-left ``x, y``.
        patch_size_level0: side of each patch in level-0 pixels.
        stride_level0: step between grid positions in level-0 pixels.
        read_level: the pyramid level a reader should decode (informational; see
            :func:`best_level`).
        spec: the spec that made the grid.
        tissue_fraction: (N,) float32 tissue fraction of each patch.
        slide_mpp: level-0 µm/px used for the arithmetic, and ``mpp_source`` where it came from.
        level0_width, level0_height: slide size in level-0 px.
        out_size: pixel side of the patch handed to the model.
    """

    coords: np.ndarray
    patch_size_level0: int
    stride_level0: int
    read_level: int
    spec: GridSpec
    tissue_fraction: np.ndarray
    slide_mpp: float
    mpp_source: str | None
    level0_width: int
    level0_height: int
    out_size: int
    grid_shape: tuple[int, int] = field(default=(0, 0))  # (rows, cols) of candidate positions

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def level0_magnification(self) -> float:
        """``10 / slide_mpp`` (exact)."""
        return mpp_to_magnification(self.slide_mpp)


def best_level(level_downsamples: list[float], wanted: float, tolerance: float = 0.02) -> int:
    """Index of the coarsest level whose downsample is ≤ ``wanted`` (within ``tolerance``).

    A level at 4.002 counts as 4 when 4 is wanted; reading from a finer level and shrinking
    never loses detail, reading from a coarser one would.
    """
    best, best_ds = 0, 0.0
    for i, ds in enumerate(level_downsamples):
        if ds <= wanted * (1.0 + tolerance) and ds > best_ds:
            best, best_ds = i, ds
    return best


def level0_size(patch_size: int, target_mpp: float, slide_mpp: float) -> int:
    """``round(patch_size · target_mpp / slide_mpp)``, at least 1."""
    return max(1, int(round(patch_size * target_mpp / slide_mpp)))


def _too_many(slide: _GridSlide, spec: GridSpec, count: str, size0: int, stride0: int,
              mpp: float, max_patches: int) -> TooManyPatchesError:  # fmt: skip
    source = getattr(slide, "mpp_source", None)
    where = {"file": "recorded in the file", "user": "given by you"}.get(source, "")
    return TooManyPatchesError(
        f"{slide.path}: the patch grid would hold {count} patches, more than the limit of "
        f"{max_patches:,} (patches of {size0} level-0 px every {stride0} px: "
        f"{spec.patch_size} px at {spec.target_mpp:g} µm/px on a slide of "
        f"{slide.level_dimensions[0][0]:,} × {slide.level_dimensions[0][1]:,} px at "
        f"{mpp:g} µm/px{' ' + where if where else ''}). Check the slide's pixel size (--mpp) and "
        "the patch settings; to cut this many patches anyway, confirm with --max-patches N on "
        "the command line (0: no limit), or make_grid(..., max_patches=None) in Python."
    )


def make_grid(
    slide: _GridSlide,
    spec: GridSpec,
    tissue: TissueMask | None = None,
    encoder_input: int | None = None,
    max_patches: int | None = DEFAULT_MAX_PATCHES,
) -> TileGrid:
    """Lay ``spec`` over ``slide`` and keep the patches with enough tissue.

    Only patches lying entirely inside level 0 are produced. With ``tissue=None`` every grid
    position is kept (tissue fraction reported as 1). Raises
    :class:`~napari_gpfm.slide.errors.MissingMppError` if the slide has no mpp (open it with
    ``mpp=`` / ``Slide.with_mpp`` to override), and :class:`TooManyPatchesError` when more than
    ``max_patches`` patches would be kept (``None`` or 0: no limit); candidate positions are
    then evaluated block by block, so an absurd grid never allocates its whole layout.
    """
    mpp = getattr(slide, "mpp", None)
    if mpp is None or not mpp > 0 or not np.isfinite(mpp):
        raise MissingMppError(slide.path, "cutting patches at an exact physical size",
                              getattr(slide, "mpp_note", None))  # fmt: skip
    mpp = float(mpp)
    w0, h0 = (int(v) for v in slide.level_dimensions[0])
    size0 = level0_size(spec.patch_size, spec.target_mpp, mpp)
    stride0 = level0_size(spec.stride, spec.target_mpp, mpp)
    out_size = spec.out_size(encoder_input)
    limit = int(max_patches) if max_patches else None

    n_cols = max(0, (w0 - size0) // stride0 + 1) if w0 >= size0 else 0
    n_rows = max(0, (h0 - size0) // stride0 + 1) if h0 >= size0 else 0
    xs = np.arange(n_cols, dtype=np.int64) * stride0
    filtering = tissue is not None and spec.min_tissue > 0
    if limit is not None and n_rows * n_cols > limit and not filtering:
        raise _too_many(slide, spec, f"{n_rows * n_cols:,}", size0, stride0, mpp, limit)
    rows_per_block = max(1, _GRID_BLOCK // max(1, n_cols))
    coords_parts, frac_parts = [], []
    kept = 0
    for r0 in range(0, n_rows, rows_per_block):
        ys = np.arange(r0, min(n_rows, r0 + rows_per_block), dtype=np.int64) * stride0
        if tissue is None or n_cols == 0:
            frac = np.ones((len(ys), n_cols), dtype=np.float32)
            keep = np.ones(frac.shape, dtype=bool)
        else:
            frac = tissue.fraction_grid(xs, ys, size0).astype(np.float32)
            # Tolerance: an all-tissue patch must survive min_tissue=1.0 despite float rounding.
            keep = ((frac >= spec.min_tissue - 1e-6) if spec.min_tissue > 0
                    else np.ones(frac.shape, bool))  # fmt: skip
        kept += int(keep.sum())
        if limit is not None and kept > limit:
            raise _too_many(slide, spec, f"more than {limit:,}", size0, stride0, mpp, limit)
        jj, ii = np.nonzero(keep)  # row-major: y outer, x inner
        coords_parts.append(np.stack([xs[ii], ys[jj]], axis=1).astype(np.int64))
        frac_parts.append(frac[jj, ii])
    coords = np.concatenate(coords_parts) if coords_parts else np.empty((0, 2), np.int64)
    fractions = np.concatenate(frac_parts) if frac_parts else np.empty(0, np.float32)

    downsamples = list(getattr(slide, "level_downsamples", [1.0]) or [1.0])
    return TileGrid(
        coords=np.ascontiguousarray(coords, dtype=np.int64),
        patch_size_level0=size0,
        stride_level0=stride0,
        read_level=best_level(downsamples, size0 / out_size),
        spec=spec,
        tissue_fraction=fractions.astype(np.float32, copy=False),
        slide_mpp=mpp,
        mpp_source=getattr(slide, "mpp_source", None),
        level0_width=w0,
        level0_height=h0,
        out_size=out_size,
        grid_shape=(n_rows, n_cols),
    )
