"""Tissue detection on a slide thumbnail.

Stained tissue is coloured, glass and background are grey or white, so the HSV saturation of a
thumbnail separates them well. The threshold is Otsu's (or a fixed value), never below a floor,
so a blank slide yields an *empty* mask instead of a mask of JPEG noise. The mask is cleaned with
a morphological closing and opening, small components are dropped and holes filled.

The result, :class:`TissueMask`, keeps the boolean mask with its exact downsample, polygons in
level-0 pixels (exterior + holes, for QuPath/napari shapes) and answers "what fraction of this
level-0 square is tissue?" for many squares at once via an integral image.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from napari_gpfm.errors import NapariGpfmError

__all__ = [
    "NoTissueError",
    "TissueParams",
    "TissueMask",
    "TissuePolygon",
    "detect_tissue",
    "saturation",
]


class NoTissueError(NapariGpfmError, RuntimeError):
    """No tissue (or no patch with enough tissue) was found in a slide (``RuntimeError`` too,
    for callers that catch that)."""


class _ThumbnailSource(Protocol):
    """The part of :class:`napari_gpfm.slide.Slide` that tissue detection needs."""

    path: Any
    mpp: float | None
    level_dimensions: list[tuple[int, int]]

    def thumbnail_with_downsample(self, max_side: int) -> tuple[np.ndarray, float]: ...


@dataclass(frozen=True)
class TissueParams:
    """How tissue is told apart from background.

    Attributes:
        thumbnail_max_side: longest side (px) of the thumbnail the mask is computed on.
        method: ``"otsu"`` (Otsu threshold on saturation, floored at ``min_saturation``) or
            ``"fixed"`` (use ``min_saturation`` as the threshold).
        min_saturation: saturation floor in [0, 1]; pixels at or below it are never tissue.
        close_radius: radius (thumbnail px) of the disk used to close small gaps; 0 disables.
        open_radius: radius (thumbnail px) of the disk used to remove specks; 0 disables.
        min_area_um2: components smaller than this (µm², needs the slide mpp) are dropped.
        min_area_px: components smaller than this many *thumbnail* pixels are dropped (always
            applied; the only size filter when the slide has no mpp).
        fill_holes: fill holes inside tissue components.
        max_hole_area_um2: when filling, only holes smaller than this (µm²) are filled, so
            large background areas enclosed by tissue stay out; ``None`` fills every hole.
            Needs the slide mpp, else every hole is filled.
    """

    thumbnail_max_side: int = 2048
    method: Literal["otsu", "fixed"] = "otsu"
    min_saturation: float = 0.05
    close_radius: int = 2
    open_radius: int = 1
    min_area_um2: float | None = 5000.0
    min_area_px: int = 16
    fill_holes: bool = True
    max_hole_area_um2: float | None = 50_000.0

    def __post_init__(self) -> None:
        if self.method not in ("otsu", "fixed"):
            raise ValueError(f"TissueParams.method must be 'otsu' or 'fixed', not {self.method!r}")
        if not 0.0 <= self.min_saturation <= 1.0:
            raise ValueError(
                f"TissueParams.min_saturation must be in [0, 1], got {self.min_saturation}"
            )
        if self.thumbnail_max_side < 16:
            raise ValueError("TissueParams.thumbnail_max_side must be at least 16 px")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of every parameter."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) of every parameter."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TissueParams:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TissuePolygon:
    """One tissue component: exterior ring and hole rings, each (K, 2) float ``x, y`` level-0 px."""

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)


class TissueMask:
    """Boolean tissue mask of a slide thumbnail.

    Attributes:
        mask: (h, w) bool, True where tissue.
        downsample: level-0 pixels per mask pixel (same on both axes).
        polygons: tissue components in level-0 pixel coordinates (traced on first access).
        tissue_fraction: fraction of mask pixels that are tissue.
        params: the parameters that produced the mask.
        threshold: the saturation threshold used (``inf`` if the thumbnail was uniform).
    """

    def __init__(
        self,
        mask: np.ndarray,
        downsample: float,
        params: TissueParams | None = None,
        polygons: list[TissuePolygon] | None = None,
        tissue_fraction: float | None = None,
        threshold: float = float("nan"),
    ) -> None:
        self.mask = np.asarray(mask, dtype=bool)
        self.downsample = float(downsample)
        self.params = params or TissueParams()
        self._polygons = polygons
        self.tissue_fraction = (
            float(self.mask.mean()) if tissue_fraction is None and self.mask.size else
            float(tissue_fraction or 0.0)
        )
        self.threshold = float(threshold)
        self._integral: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"TissueMask(shape={self.mask.shape}, downsample={self.downsample:.3f}, "
            f"tissue_fraction={self.tissue_fraction:.3f}, threshold={self.threshold:.3f})"
        )

    @property
    def polygons(self) -> list[TissuePolygon]:
        """Tissue components as level-0 polygons with holes (computed once, on demand)."""
        if self._polygons is None:
            self._polygons = mask_polygons(self.mask, self.downsample) if self.mask.any() else []
        return self._polygons

    @property
    def is_empty(self) -> bool:
        """True when no pixel is tissue."""
        return not bool(self.mask.any())

    def integral(self) -> np.ndarray:
        """(h+1, w+1) float64 summed-area table of the mask (cached)."""
        if self._integral is None:
            m = self.mask.astype(np.float64)
            s = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=np.float64)
            s[1:, 1:] = m.cumsum(0).cumsum(1)
            self._integral = s
        return self._integral

    def fraction_in(self, x: Any, y: Any, size0: float) -> np.ndarray | float:
        """Tissue fraction of level-0 squares ``[x, x+size0) × [y, y+size0)``.

        ``x`` and ``y`` are scalars or equal-length arrays of level-0 top-left corners. The
        fraction is area-exact: the mask is treated as piecewise constant, so bilinear
        interpolation of its integral image gives the exact covered area even when square
        borders fall inside mask pixels. Parts of a square outside the slide count as
        background. Returns a float for scalar input, else a float64 array.
        """
        scalar = np.isscalar(x) and np.isscalar(y)
        xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
        ys = np.atleast_1d(np.asarray(y, dtype=np.float64))
        if size0 <= 0:
            raise ValueError(f"size0 must be positive, got {size0}")
        ds = float(self.downsample)
        x0, x1 = xs / ds, (xs + size0) / ds
        y0, y1 = ys / ds, (ys + size0) / ds
        s = self.integral()
        covered = (
            _interp_integral(s, x1, y1)
            - _interp_integral(s, x0, y1)
            - _interp_integral(s, x1, y0)
            + _interp_integral(s, x0, y0)
        )
        area = (size0 / ds) ** 2
        frac = np.clip(covered / area, 0.0, 1.0)
        return float(frac[0]) if scalar else frac


def _interp_integral(s: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Integral of the mask over ``[0, u) × [0, v)`` (u along x/columns, v along y/rows)."""
    h, w = s.shape[0] - 1, s.shape[1] - 1
    u = np.clip(u, 0.0, w)
    v = np.clip(v, 0.0, h)
    i = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
    j = np.minimum(np.floor(v).astype(np.int64), max(h - 1, 0))
    fu, fv = u - i, v - j
    s00 = s[j, i]
    s01 = s[j, i + 1]
    s10 = s[j + 1, i]
    s11 = s[j + 1, i + 1]
    return s00 * (1 - fu) * (1 - fv) + s01 * fu * (1 - fv) + s10 * (1 - fu) * fv + s11 * fu * fv


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 (h, w, 3) image (0 for black pixels)."""
    rgb = np.asarray(rgb)[..., :3]
    mx = rgb.max(axis=-1).astype(np.float32)
    mn = rgb.min(axis=-1).astype(np.float32)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def _threshold(sat: np.ndarray, params: TissueParams) -> float:
    if params.method == "fixed":
        return params.min_saturation
    if float(sat.max()) - float(sat.min()) < 1e-6:
        # A uniform image has no two classes; Otsu is meaningless there.
        return float("inf") if float(sat.max()) <= params.min_saturation else params.min_saturation
    from skimage.filters import threshold_otsu

    return max(float(threshold_otsu(sat)), params.min_saturation)


def _area_px(area_um2: float | None, mpp: float | None, downsample: float) -> float | None:
    """Convert a level-0 area in µm² into thumbnail pixels (None if not convertible)."""
    if area_um2 is None or mpp is None:
        return None
    return float(area_um2) / (mpp * downsample) ** 2


def clean_mask(
    raw: np.ndarray, params: TissueParams, mpp: float | None, downsample: float
) -> np.ndarray:
    """Morphological clean-up of a raw thresholded mask (close, open, size filter, holes)."""
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    mask = raw.astype(bool)
    if params.close_radius > 0 and mask.any():
        # Pad so that closing does not glue tissue to the image border.
        r = params.close_radius
        padded = np.pad(mask, r)
        mask = ndi.binary_closing(padded, structure=disk(r))[r:-r, r:-r]
    if params.open_radius > 0 and mask.any():
        mask = ndi.binary_opening(mask, structure=disk(params.open_radius))
    min_px = float(params.min_area_px)
    um_px = _area_px(params.min_area_um2, mpp, downsample)
    if um_px is not None:
        min_px = max(min_px, um_px)
    if mask.any() and min_px > 1:
        labels, n = ndi.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[labels]
    if params.fill_holes and mask.any():
        filled = ndi.binary_fill_holes(mask)
        hole_px = _area_px(params.max_hole_area_um2, mpp, downsample)
        if hole_px is None:
            mask = filled
        else:
            holes, n = ndi.label(filled & ~mask)
            sizes = np.bincount(holes.ravel(), minlength=n + 1)
            small = sizes < hole_px
            small[0] = False
            mask = mask | small[holes]
    return mask


def mask_polygons(
    mask: np.ndarray, downsample: float, simplify: float = 0.5
) -> list[TissuePolygon]:
    """Trace each connected component of ``mask`` into a level-0 polygon with holes.

    Rings are closed (first vertex repeated last) and simplified to ``simplify`` mask pixels.

    Contours are traced at the 0.5 iso-line, i.e. on the edges between tissue and background
    pixels; mask pixel ``i`` covers level-0 ``[i·ds, (i+1)·ds)``, so a contour point at centre
    coordinate ``c`` maps to level-0 ``(c + 0.5)·ds``.
    """
    from scipy import ndimage as ndi
    from skimage.measure import approximate_polygon, find_contours

    def rings(component: np.ndarray) -> list[np.ndarray]:
        padded = np.pad(component.astype(np.float32), 1)
        out = []
        for c in find_contours(padded, 0.5):
            # Simplify to half a mask pixel: same shape, far fewer vertices.
            rc = approximate_polygon(c, tolerance=simplify) - 1.0  # undo padding
            xy = np.stack([rc[:, 1], rc[:, 0]], axis=1)
            out.append(((xy + 0.5) * downsample).astype(np.float64))
        return out

    polygons: list[TissuePolygon] = []
    labels, n = ndi.label(mask)
    for sl_idx, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = labels[sl] == sl_idx
        offset = np.array([sl[1].start, sl[0].start], dtype=np.float64) * downsample
        filled = ndi.binary_fill_holes(comp)
        ext = rings(filled)
        if not ext:
            continue
        exterior = max(ext, key=len) + offset
        holes_mask, nh = ndi.label(filled & ~comp)
        holes = []
        for h in range(1, nh + 1):
            hr = rings(holes_mask == h)
            if hr:
                holes.append(max(hr, key=len) + offset)
        polygons.append(TissuePolygon(exterior=exterior, holes=holes))
    return polygons


def detect_tissue(slide: _ThumbnailSource, params: TissueParams | None = None) -> TissueMask:
    """Detect tissue on a thumbnail of ``slide``.

    Never raises for a blank slide: the returned mask is then empty (``is_empty``); callers
    that need tissue raise :class:`NoTissueError` with :func:`no_tissue_message`.
    """
    params = params or TissueParams()
    thumb, downsample = slide.thumbnail_with_downsample(params.thumbnail_max_side)
    thumb = np.asarray(thumb)
    if thumb.ndim == 2:
        thumb = np.stack([thumb] * 3, axis=-1)
    sat = saturation(thumb)
    thr = _threshold(sat, params)
    raw = sat > thr
    mpp = getattr(slide, "mpp", None)
    mask = clean_mask(raw, params, mpp, float(downsample))
    return TissueMask(mask=mask, downsample=float(downsample), params=params, threshold=thr)


def no_tissue_message(slide_path: Any, params: TissueParams, detail: str = "") -> str:
    """Error text for a slide without usable tissue, naming the slide and the parameters."""
    what = detail or "no tissue detected"
    return (
        f"{slide_path}: {what} with {params!r}. If the slide does contain tissue, lower "
        "min_saturation / use method='fixed', reduce min_area_um2, or lower --min-tissue."
    )
