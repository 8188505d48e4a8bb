"""Per-patch values -> 2-D rasters aligned with the slide in napari world coordinates.

Geometry (see ``docs/ARCHITECTURE.md``, "layers"): a patch whose level-0 top-left pixel is
``x`` and whose side is ``P`` covers level-0 pixels ``x … x+P-1``. napari puts the centre of
slide pixel ``k`` at world ``k·mpp``, so the patch covers world
``[(x − 0.5)·mpp, (x + P − 0.5)·mpp)``.

A raster cell is one grid stride ``s`` (level-0 px). With cell 0 starting at level-0 ``x0`` the
raster layer gets ``scale = s·mpp`` and ``translate = (x0 + s/2 − 0.5)·mpp`` (y first), which
puts the centre of cell ``j`` at world ``(x0 + (j + 0.5)·s − 0.5)·mpp``: cell edges then fall
exactly on patch footprint edges. Without an mpp the unit is level-0 pixels (``mpp = 1``).

The stride is inferred from the coordinates: the gcd of all coordinate offsets from the grid
origin and of the patch size (so overlapping grids, stride < patch size, work: each patch covers
``(P/s)²`` cells, and a patch size that is not a multiple of the stride falls back to
``gcd(P, stride)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "MAX_CELLS",
    "PatchGrid",
    "Raster",
    "patch_grid",
    "heatmap_raster",
    "labels_raster",
]

#: Refuse rasters larger than this many cells (a jittered grid would make the gcd tiny).
MAX_CELLS = 200_000_000


@dataclass(frozen=True, eq=False)
class PatchGrid:
    """Raster geometry of a patch grid: where each patch lies in a lattice of square cells.

    Attributes
    ----------
    x0, y0 : level-0 pixel where cell (0, 0) starts.
    cell : cell side in level-0 pixels (the grid stride, or gcd(P, stride)).
    patch_size_level0 : patch side ``P`` in level-0 pixels.
    k : cells per patch side (``P // cell``); each patch covers ``k × k`` cells.
    shape : (rows, cols) of the raster.
    rows, cols : top-left cell of each patch (int64, length N).
    mpp : µm per level-0 pixel used for world units, or None (unit = level-0 px).
    """

    x0: int
    y0: int
    cell: int
    patch_size_level0: int
    k: int
    shape: tuple[int, int]
    rows: np.ndarray = field(repr=False)
    cols: np.ndarray = field(repr=False)
    mpp: float | None = None

    # --- world geometry -----------------------------------------------------------------
    @property
    def unit(self) -> str:
        """World unit of ``scale``/``translate``: "µm" when mpp is known, else "px" (level 0)."""
        return "µm" if self.mpp is not None else "px"

    @property
    def _m(self) -> float:
        return float(self.mpp) if self.mpp is not None else 1.0

    @property
    def scale(self) -> tuple[float, float]:
        """napari ``scale`` (y, x) of a raster with one value per cell."""
        s = self.cell * self._m
        return (s, s)

    @property
    def translate(self) -> tuple[float, float]:
        """napari ``translate`` (y, x): centre of cell (0, 0) in world units."""
        half = self.cell / 2.0 - 0.5
        return ((self.y0 + half) * self._m, (self.x0 + half) * self._m)

    @property
    def n_patches(self) -> int:
        return int(self.rows.shape[0])

    # --- click -> patch ---------------------------------------------------------------------
    def world_to_level0(self, world_yx: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous level-0 (y, x) of world points, in the pixel-centre convention.

        Pixel ``k`` covers continuous coordinates ``[k − 0.5, k + 0.5)``.
        """
        return np.asarray(world_yx, dtype=np.float64) / self._m

    def patch_index_at(self, world_yx: Sequence[float] | np.ndarray) -> int | np.ndarray:
        """Index of the patch covering a world point (y, x), or -1 where no patch covers it.

        Accepts one point (returns an int) or an (M, 2) array (returns an int64 array). With
        overlapping patches the one whose centre is nearest the point wins (ties: lowest index).
        Cost is O(k²) per point through the raster of patch indices, independent of N.
        """
        pts = np.asarray(world_yx, dtype=np.float64)
        single = pts.ndim == 1
        pts = np.atleast_2d(pts)
        u = self.world_to_level0(pts)  # continuous level-0 (y, x)
        # level-0 pixel containing the point (pixel k covers [k - 0.5, k + 0.5))
        py = np.floor(u[:, 0] + 0.5)
        px = np.floor(u[:, 1] + 0.5)
        cr = np.floor((py - self.y0) / self.cell).astype(np.int64)
        cc = np.floor((px - self.x0) / self.cell).astype(np.int64)
        table = self._index_table
        P = self.patch_size_level0
        best = np.full(len(pts), -1, dtype=np.int64)
        best_d = np.full(len(pts), np.inf)
        for dr in range(self.k):
            for dc in range(self.k):
                r, c = cr - dr, cc - dc
                ok = (r >= 0) & (c >= 0) & (r < self.shape[0]) & (c < self.shape[1])
                idx = np.full(len(pts), -1, dtype=np.int64)
                idx[ok] = table[r[ok], c[ok]]
                ok &= idx >= 0
                ty = self.y0 + r * self.cell  # top-left level-0 pixel of the candidate patch
                tx = self.x0 + c * self.cell
                inside = ok & (py >= ty) & (py < ty + P) & (px >= tx) & (px < tx + P)
                d = (u[:, 0] - (ty + P / 2.0 - 0.5)) ** 2 + (u[:, 1] - (tx + P / 2.0 - 0.5)) ** 2
                better = inside & ((d < best_d) | ((d == best_d) & (idx < best)))
                best[better] = idx[better]
                best_d[better] = d[better]
        return int(best[0]) if single else best

    @property
    def _index_table(self) -> np.ndarray:
        """(rows, cols) int64: index of the patch whose top-left is that cell, else -1."""
        cached = self.__dict__.get("_table")
        if cached is None:
            cached = np.full(self.shape, -1, dtype=np.int64)
            # reversed so the lowest index wins on duplicate coordinates
            order = np.arange(self.n_patches)[::-1]
            cached[self.rows[order], self.cols[order]] = order
            object.__setattr__(self, "_table", cached)
        return cached

    # --- raster helpers ---------------------------------------------------------------------
    def _covered_flat(self, dr: int, dc: int) -> np.ndarray:
        return (self.rows + dr) * self.shape[1] + (self.cols + dc)

    def coverage(self, mask: np.ndarray | None = None) -> np.ndarray:
        """(rows, cols) bool: cells covered by at least one (selected) patch."""
        sel = slice(None) if mask is None else np.asarray(mask, dtype=bool)
        out = np.zeros(self.shape[0] * self.shape[1], dtype=bool)
        for dr in range(self.k):
            for dc in range(self.k):
                out[self._covered_flat(dr, dc)[sel]] = True
        return out.reshape(self.shape)


@dataclass(frozen=True, eq=False)
class Raster:
    """A raster over a :class:`PatchGrid` with the napari placement to show it.

    ``data`` is (rows, cols): float32 with NaN where no patch lies (heatmaps) or int32 with 0 as
    background (labels). ``scale``/``translate`` are (y, x) in ``unit``.
    """

    data: np.ndarray
    grid: PatchGrid

    @property
    def scale(self) -> tuple[float, float]:
        return self.grid.scale

    @property
    def translate(self) -> tuple[float, float]:
        return self.grid.translate

    @property
    def unit(self) -> str:
        return self.grid.unit


def _gcd_stride(values: np.ndarray) -> int:
    offs = np.unique(values - values.min())
    return int(np.gcd.reduce(offs)) if offs.size else 0


def patch_grid(
    coords: np.ndarray,
    patch_size_level0: int,
    mpp: float | None = None,
    max_cells: int = MAX_CELLS,
) -> PatchGrid:
    """Infer the raster geometry of a patch grid.

    Parameters
    ----------
    coords : (N, 2) int, level-0 top-left (x, y) of each patch.
    patch_size_level0 : patch side in level-0 pixels.
    mpp : µm per level-0 pixel; None gives world units in level-0 pixels.
    max_cells : refuse rasters with more cells than this (clear error instead of a MemoryError).
    """
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be an (N, 2) array of level-0 (x, y), got shape {c.shape}")
    if c.shape[0] == 0:
        raise ValueError("coords is empty: there are no patches to place on a raster")
    if not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.equal(np.round(c), c)):
            raise ValueError("coords must be whole level-0 pixels")
    c = c.astype(np.int64)
    P = int(patch_size_level0)
    if P <= 0:
        raise ValueError(f"patch_size_level0 must be positive, got {patch_size_level0}")
    if mpp is not None and not (mpp > 0):
        raise ValueError(f"mpp must be positive, got {mpp}")
    x, y = c[:, 0], c[:, 1]
    cell = int(np.gcd.reduce([_gcd_stride(x), _gcd_stride(y), P]))
    k = P // cell
    x0, y0 = int(x.min()), int(y.min())
    cols = (x - x0) // cell
    rows = (y - y0) // cell
    shape = (int(rows.max()) + k, int(cols.max()) + k)
    if shape[0] * shape[1] > max_cells:
        raise ValueError(
            f"a raster of {shape[0]}×{shape[1]} cells of {cell} px is too large: the patch "
            f"coordinates are not on a regular grid (inferred stride {cell} px for patches "
            f"of {P} px)"
        )
    return PatchGrid(x0, y0, cell, P, k, shape, rows, cols, None if mpp is None else float(mpp))


def heatmap_raster(
    values: np.ndarray,
    coords: np.ndarray | PatchGrid,
    patch_size_level0: int | None = None,
    mpp: float | None = None,
) -> Raster:
    """Per-patch values -> float32 raster (NaN where no patch), averaged where patches overlap.

    ``coords`` may be the (N, 2) coordinates (then ``patch_size_level0`` is required) or a
    :class:`PatchGrid` already built for them (its mpp is used). NaN values count as missing.
    """
    grid = _as_grid(coords, patch_size_level0, mpp)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.shape[0] != grid.n_patches:
        raise ValueError(f"got {v.shape[0]} values for {grid.n_patches} patches")
    ok = np.isfinite(v)
    n = grid.shape[0] * grid.shape[1]
    total = np.zeros(n)
    count = np.zeros(n)
    for dr in range(grid.k):
        for dc in range(grid.k):
            flat = grid._covered_flat(dr, dc)[ok]
            total += np.bincount(flat, weights=v[ok], minlength=n)
            count += np.bincount(flat, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        data = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return Raster(data.astype(np.float32).reshape(grid.shape), grid)


def labels_raster(
    labels: np.ndarray,
    coords: np.ndarray | PatchGrid,
    patch_size_level0: int | None = None,
    mpp: float | None = None,
    shift: int = 1,
) -> Raster:
    """Per-patch integer labels -> int32 raster with 0 as background.

    A patch with label ``l ≥ 0`` paints ``l + shift`` (default 1, so cluster/class 0 is visible
    as 1); negative labels mean "unlabelled" and paint nothing. Where patches overlap
    (stride < patch size) each cell takes the **majority** label of the patches covering it;
    ties go to the smallest label.
    """
    grid = _as_grid(coords, patch_size_level0, mpp)
    lab = np.asarray(labels).reshape(-1).astype(np.int64)
    if lab.shape[0] != grid.n_patches:
        raise ValueError(f"got {lab.shape[0]} labels for {grid.n_patches} patches")
    if shift < 1:
        raise ValueError("shift must be ≥ 1 so that label 0 stays distinct from background")
    n = grid.shape[0] * grid.shape[1]
    out = np.zeros(n, dtype=np.int32)
    if grid.k == 1:
        ok = lab >= 0
        out[grid._covered_flat(0, 0)[ok]] = (lab[ok] + shift).astype(np.int32)
        return Raster(out.reshape(grid.shape), grid)
    best = np.zeros(n, dtype=np.int64)
    for value in np.unique(lab[lab >= 0]):  # ascending: strict '>' keeps the smallest on ties
        sel = lab == value
        votes = np.zeros(n, dtype=np.int64)
        for dr in range(grid.k):
            for dc in range(grid.k):
                votes += np.bincount(grid._covered_flat(dr, dc)[sel], minlength=n)
        win = votes > best
        best[win] = votes[win]
        out[win] = value + shift
    return Raster(out.reshape(grid.shape), grid)


def _as_grid(coords: np.ndarray | PatchGrid, patch_size_level0: int | None, mpp: float | None):
    if isinstance(coords, PatchGrid):
        return coords
    if patch_size_level0 is None:
        raise ValueError("patch_size_level0 is required when coords are given as an array")
    return patch_grid(coords, patch_size_level0, mpp)
