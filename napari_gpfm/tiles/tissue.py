"""Tissue detection on a slide thumbnail.

Stained tissue is coloured, glass and background are grey or white, so the HSV saturation of a
thumbnail separates them well. :class:`TissueParams.method` chooses how the threshold is found:

``"auto"`` (default)
    Otsu's threshold when the saturation histogram is *bimodal* (glass and tissue), else an
    absolute rule calibrated on H&E. The histogram counts as bimodal when Otsu's lower class
    looks like glass (mean saturation below ``AUTO_GLASS_MAX_SATURATION``) and the two class
    means lie at least ``AUTO_MIN_SEPARATION`` apart. On an image that is all tissue (a crop,
    an ROI export, a TMA core, a biopsy) Otsu splits the *tissue* into pale and dark halves
    instead; there the absolute rule applies: background is bright and unsaturated, so a
    pixel is tissue when its saturation is at least ``ABSOLUTE_SATURATION`` (or
    ``min_saturation`` if higher). Calibration on the bundled H&E sample: 95 % of glass pixels
    have saturation < 0.03 and JPEG noise on glass stays below 0.06; fewer than 4 % of tissue
    pixels fall below 0.07 and nearly all of those are white gaps between fibres, which the
    clean-up fills. A scanner colour cast that tints the glass (saturation up to about 0.09)
    keeps the histogram bimodal, so Otsu, not the absolute rule, handles it. With either
    rule, near-black pixels (max RGB below ``ABSOLUTE_MIN_VALUE``: scanner padding, whose JPEG
    noise has meaningless saturation) are never tissue.

    The clean-up of "auto" also fills background *pockets* that touch the image border when
    they are smaller than ``max_hole_area_um2`` (a crop cuts holes open: fat cells, gaps
    between fibres), and drops small components only after holes are filled (a network of
    fat-cell membranes is one large component). A consequence: in an image smaller than
    ``max_hole_area_um2`` (50,000 µm², about a 224 µm square, e.g. a single patch), any
    background touching tissue counts as part of it; lower ``max_hole_area_um2`` for tight
    outlines of tiny images.
``"otsu"``
    Otsu's threshold on saturation, floored at ``min_saturation`` (the behaviour before
    "auto"; kept bit for bit, so stores made with it stay reproducible).
``"fixed"``
    ``min_saturation`` is the threshold.
``"none"``
    No detection: the whole image is tissue and every patch is kept (crops and ROIs).

The threshold is never below ``min_saturation``, so a blank slide yields an *empty* mask
instead of a mask of JPEG noise. The mask is cleaned with a morphological closing and opening,
small components are dropped and holes filled.

The result, :class:`TissueMask`, keeps the boolean mask with its exact downsample, polygons in
level-0 pixels (exterior + holes, for QuPath/napari shapes), a one-line :attr:`~TissueMask.summary`
of what was found and how, and answers "what fraction of this level-0 square is tissue?" for
every square of a patch lattice at once via an integral image (:meth:`TissueMask.fraction_grid`).

Mask resolution: the mask is made on a thumbnail no larger than ``thumbnail_max_side`` (2048 px)
and, with method "auto", no finer than ``mask_mpp`` (4 µm/px) when the slide has an mpp. Before
``mask_mpp`` existed a small slide was segmented at nearly full resolution (0.7 µm/px for the
bundled 2220 x 2967 sample) for no gain: the bundled sample's patches agree with its
hand-traced outline equally from 0.7 to 8 µm/px (tile Dice 0.86), while the work grows with
the square of the resolution. At 4 µm/px the thumbnail is usually a pyramid level read as is
(no resize), the morphology radii mean 4-8 µm whatever the slide size, and a slide larger
than 8 mm still gets the 2048 px thumbnail. The clean-up's radius 1 and 2 closing/opening are
done with shifted boolean operations (the pixels of ``scipy.ndimage`` with ``disk(r)``) and
the coverage of each patch with one int32 summed-area table: no full-resolution mask is ever
made (see ``bench/bench_tissue.py`` for the comparison with hs2p).

Recipe stability: :class:`TissueParams` is hashed into the embedding recipe key
(``napari_gpfm.embeddings.recipe``). "auto" and "none" were added as *values* of the existing
``method`` field, not as new fields, so the JSON of every old parameter set is unchanged:
``TissueParams.from_dict(old).to_dict() == old``, and stores made before (method "otsu") keep
their key and open as before. The constants of "auto" below are part of that method's
definition: changing them changes the masks "auto" makes, so it needs a new method name.
New stores made with the default ("auto") get a new key; to keep using a cohort embedded
with the old default, pass ``TissueParams(method="otsu")`` (``--tissue-method otsu``).
``mask_mpp`` follows the same rule: :meth:`TissueParams.to_dict` leaves it out when ``None``,
:meth:`TissueParams.from_dict` reads a dict without it as ``None``, and only "auto" defaults
to 4 µm/px, so old "otsu"/"fixed" parameter sets keep their JSON, key and masks, and a store
made with "auto" before the field existed opens with its own recipe (``mask_mpp=None``); a
new "auto" run is a new recipe (``TissueParams(mask_mpp=None)`` reproduces the old one).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from napari_gpfm.errors import NapariGpfmError

__all__ = [
    "ABSOLUTE_SATURATION",
    "DEFAULT_MASK_MPP",
    "METHODS",
    "NoTissueError",
    "TissueParams",
    "TissueMask",
    "TissuePolygon",
    "clean_mask",
    "clean_mask_auto",
    "detect_tissue",
    "no_tissue_message",
    "saturation",
    "whole_image_mask",
]

#: Values of :attr:`TissueParams.method`.
METHODS: tuple[str, ...] = ("auto", "otsu", "fixed", "none")

#: "auto", absolute rule: a pixel is tissue at or above this saturation (H&E calibration).
ABSOLUTE_SATURATION = 0.07
#: "auto", absolute rule: pixels whose max RGB is below this are never tissue (black padding).
ABSOLUTE_MIN_VALUE = 25
#: "auto", bimodality test: Otsu's lower class must have a mean saturation below this (glass).
AUTO_GLASS_MAX_SATURATION = 0.09
#: "auto", bimodality test: Otsu's class means must lie at least this far apart.
AUTO_MIN_SEPARATION = 0.10
#: :attr:`TissueParams.mask_mpp` of method "auto" unless given: masks no finer than 4 µm/px.
DEFAULT_MASK_MPP = 4.0
#: :attr:`TissueParams.mask_mpp`'s default: resolved by the method (see that field).
METHOD_DEFAULT = "method default"

_HIST_BINS = 256
# TissueMask.integral: masks of at least this many pixels sum over rows with one add per row.
_ROW_LOOP_PIXELS = 1 << 20
# TissueMask.fraction_grid: at most this many float64 entries in its row table (32 MB).
_FRACTION_TABLE_ENTRIES = 4_000_000


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

    The JSON of these parameters is part of the embedding recipe key: add no field without a
    plan for old recipes (see the module docstring, "Recipe stability").

    Attributes:
        thumbnail_max_side: longest side (px) of the thumbnail the mask is computed on.
        method: ``"auto"`` (Otsu when the saturation histogram is bimodal, else the absolute
            H&E rule: saturation ≥ 0.07; works on whole slides, crops, TMAs and all-tissue
            images), ``"otsu"`` (Otsu threshold on saturation, floored at ``min_saturation``;
            the default before "auto"), ``"fixed"`` (use ``min_saturation`` as the threshold)
            or ``"none"`` (no detection: the whole image is tissue, every patch is kept).
        min_saturation: saturation floor in [0, 1]; pixels at or below it are never tissue.
        close_radius: radius (thumbnail px) of the disk used to close small gaps; 0 disables.
        open_radius: radius (thumbnail px) of the disk used to remove specks; 0 disables.
        min_area_um2: components smaller than this (µm², needs the slide mpp) are dropped.
        min_area_px: components smaller than this many *thumbnail* pixels are dropped (always
            applied; the only size filter when the slide has no mpp).
        fill_holes: fill holes inside tissue components.
        max_hole_area_um2: when filling, only holes smaller than this (µm²) are filled, so
            large background areas enclosed by tissue stay out; ``None`` fills every hole.
            Needs the slide mpp, else every hole is filled. With "auto", background pockets
            that touch the image border are filled under the same limit.
        mask_mpp: the mask is made no finer than this many µm per pixel (the thumbnail's
            longest side is at most ``slide extent / mask_mpp``, and never more than
            ``thumbnail_max_side``); ``None``: ``thumbnail_max_side`` alone sets it, as before
            this field existed. Unless given it follows the method: ``DEFAULT_MASK_MPP``
            (4 µm/px) for "auto", ``None`` for "otsu", "fixed" and "none" (kept bit for bit).
            At 4 µm/px a 224 px patch at 0.5 µm/px spans 28 mask pixels and tissue agrees
            with a hand-traced outline as well as at 0.7 µm/px, while a small slide is no
            longer segmented at nearly full resolution (see "Mask resolution" in the module
            docstring). Needs the slide mpp, else ignored.
    """

    thumbnail_max_side: int = 2048
    method: Literal["auto", "otsu", "fixed", "none"] = "auto"
    min_saturation: float = 0.05
    close_radius: int = 2
    open_radius: int = 1
    min_area_um2: float | None = 5000.0
    min_area_px: int = 16
    fill_holes: bool = True
    max_hole_area_um2: float | None = 50_000.0
    mask_mpp: float | str | None = METHOD_DEFAULT

    def __post_init__(self) -> None:
        if self.mask_mpp == METHOD_DEFAULT:
            # "auto" makes its masks at DEFAULT_MASK_MPP; "otsu" and "fixed" stay bit for bit
            # what they were before the field existed (None), and "none" reads no pixels.
            object.__setattr__(self, "mask_mpp",
                               DEFAULT_MASK_MPP if self.method == "auto" else None)  # fmt: skip
        if self.method not in METHODS:
            raise ValueError(
                f"TissueParams.method must be one of {', '.join(map(repr, METHODS))}, "
                f"not {self.method!r}"
            )
        if not 0.0 <= self.min_saturation <= 1.0:
            raise ValueError(
                f"TissueParams.min_saturation must be in [0, 1], got {self.min_saturation}"
            )
        if self.thumbnail_max_side < 16:
            raise ValueError("TissueParams.thumbnail_max_side must be at least 16 px")
        if self.mask_mpp is not None and not (
            isinstance(self.mask_mpp, (int, float)) and math.isfinite(self.mask_mpp)
            and self.mask_mpp > 0
        ):  # fmt: skip
            raise ValueError(
                f"TissueParams.mask_mpp must be a positive µm/px or None, got {self.mask_mpp}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of every parameter; ``mask_mpp`` only when set, so
        a parameter set from before that field keeps its JSON (and recipe key)."""
        d = dataclasses.asdict(self)
        if d["mask_mpp"] is None:
            del d["mask_mpp"]
        return d

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) of every parameter."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TissueParams:
        """Inverse of :meth:`to_dict`; unknown keys are ignored. A dict without ``mask_mpp``
        (every parameter set recorded before that field existed) means ``mask_mpp=None``:
        the mask is made as it was then."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("mask_mpp", None)
        return cls(**kw)

    def mask_side(
        self,
        level0_size: tuple[int, int],
        mpp: float | None,
        level_dimensions: list[tuple[int, int]] | None = None,
    ) -> int:
        """Longest side (px) of the thumbnail the mask is made on, for a slide of
        ``level0_size`` (w, h) px at ``mpp`` µm/px: ``thumbnail_max_side``, lowered so that
        a mask pixel is at least ``mask_mpp`` µm (never below 16 px).

        With ``mask_mpp`` set, a pyramid level (``level_dimensions``) whose longest side lies
        within [3/4, 1] of that side is taken as it is: decoding it is cheaper than decoding a
        finer level and resizing (a 100,000² px pyramid: its 1,563 px level rather than the
        3,125 px one shrunk to 2,048), at most 4/3 coarser than asked."""
        side = int(self.thumbnail_max_side)
        if self.mask_mpp is None:
            return side
        if mpp is not None and mpp > 0 and math.isfinite(mpp):
            extent_um = max(int(v) for v in level0_size) * float(mpp)
            side = min(side, max(16, int(math.floor(extent_um / self.mask_mpp + 1e-9))))
        fits = [max(int(v) for v in dims) for dims in (level_dimensions or [])]
        fits = [n for n in fits if max(16, math.ceil(0.75 * side)) <= n <= side]
        return max(fits) if fits else side


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
        threshold: the saturation threshold used (``inf`` if the thumbnail was uniform,
            ``nan`` for method "none").
        rule: the rule that made the mask: ``"otsu"``, ``"absolute"``, ``"fixed"`` or
            ``"none"`` (with method "auto", the one it chose).
        reason: why "auto" chose its rule (e.g. "unimodal histogram"); "" otherwise.
        summary: one line for users: what was found and how.
    """

    def __init__(
        self,
        mask: np.ndarray,
        downsample: float,
        params: TissueParams | None = None,
        polygons: list[TissuePolygon] | None = None,
        tissue_fraction: float | None = None,
        threshold: float = float("nan"),
        rule: str | None = None,
        reason: str = "",
    ) -> None:
        self.mask = np.asarray(mask, dtype=bool)
        self.downsample = float(downsample)
        self.params = params or TissueParams()
        self._polygons = polygons
        self.tissue_fraction = (
            np.count_nonzero(self.mask) / self.mask.size
            if tissue_fraction is None and self.mask.size else
            float(tissue_fraction or 0.0)
        )
        self.threshold = float(threshold)
        self.rule = rule or ("otsu" if self.params.method == "auto" else self.params.method)
        self.reason = reason
        self._integral: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"TissueMask(shape={self.mask.shape}, downsample={self.downsample:.3f}, "
            f"tissue_fraction={self.tissue_fraction:.3f}, threshold={self.threshold:.3f}, "
            f"rule={self.rule!r})"
        )

    @property
    def how(self) -> str:
        """How the mask was made, e.g. "auto: unimodal histogram → absolute rule,
        saturation ≥ 0.07"."""
        return _describe(self.params.method, self.rule, self.threshold, self.reason)

    @property
    def summary(self) -> str:
        """One line for users: "tissue 62% of the image (auto: unimodal histogram → absolute
        rule, saturation ≥ 0.07)", "no tissue (…)", or "whole image used as tissue (…)"."""
        if self.rule == "none":
            return f"whole image used as tissue ({self.how})"
        if self.is_empty:
            return f"no tissue ({self.how})"
        pct = 100.0 * self.tissue_fraction
        share = f"{pct:.0f}%" if pct >= 1 else f"{pct:.2g}%"
        return f"tissue {share} of the image ({self.how})"

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
        """(h+1, w+1) summed-area table of the mask (cached): int32 while the mask has fewer
        than 2**31 pixels (exact counts, half the memory and time of float64), else int64."""
        if self._integral is None:
            h, w = self.mask.shape
            dtype = np.int32 if h * w < 2**31 else np.int64
            s = np.zeros((h + 1, w + 1), dtype=dtype)
            np.cumsum(self.mask, axis=1, dtype=dtype, out=s[1:, 1:])
            if h * w < _ROW_LOOP_PIXELS:
                np.cumsum(s[1:, 1:], axis=0, out=s[1:, 1:])
            else:  # one vectorised add per row: faster than numpy's cumsum over axis 0 there
                for r in range(2, h + 1):
                    np.add(s[r], s[r - 1], out=s[r])
            self._integral = s
        return self._integral

    def fraction_grid(self, xs: Any, ys: Any, size0: float) -> np.ndarray:
        """Tissue fractions of the level-0 squares at every ``(x, y)`` of the lattice
        ``xs × ys``, as a ``(len(ys), len(xs))`` float64 array (row-major: ``ys`` outer).

        The fraction is area-exact: the mask is treated as piecewise constant, so linear
        interpolation of its summed-area table along each axis gives the exact covered area
        even when square borders fall inside mask pixels. Parts of a square outside the slide
        count as background. Computed separably: the table is interpolated at the lattice's
        ``2·len(ys)`` row borders, then at its ``2·len(xs)`` column borders, and each square
        is four lookups in that small table (a whole-slide grid of 200,000 candidates costs a
        few milliseconds; no candidate array is built).
        """
        xs = np.asarray(xs, dtype=np.float64).ravel()
        ys = np.asarray(ys, dtype=np.float64).ravel()
        if size0 <= 0:
            raise ValueError(f"size0 must be positive, got {size0}")
        nx, ny = len(xs), len(ys)
        if nx == 0 or ny == 0:
            return np.zeros((ny, nx), dtype=np.float64)
        ds = float(self.downsample)
        h, w = self.mask.shape
        iu, fu = _interp_weights(np.concatenate([xs, xs + size0]) / ds, w)
        iv_all, fv_all = _interp_weights(np.concatenate([ys, ys + size0]) / ds, h)
        # the summed-area table's rows at the lattice's row borders only (exact integers)
        needed = np.unique(np.concatenate([iv_all, iv_all + 1]))
        s = self._integral_rows(needed)
        pos = np.searchsorted(needed, iv_all)  # row iv is s[pos], so row iv + 1 is s[pos + 1]
        out = np.empty((ny, nx), dtype=np.float64)
        step = max(1, _FRACTION_TABLE_ENTRIES // (2 * (w + 1)))  # bounds the row table
        for a in range(0, ny, step):
            m = min(step, ny - a)
            sel = np.concatenate([np.arange(a, a + m), np.arange(ny + a, ny + a + m)])
            ip, fv = pos[sel], fv_all[sel]
            rows = s[ip] * (1 - fv)[:, None] + s[ip + 1] * fv[:, None]  # (2 m, w + 1)
            table = rows[:, iu] * (1 - fu) + rows[:, iu + 1] * fu  # (2 m, 2 nx)
            out[a : a + m] = table[m:, nx:] - table[:m, nx:] - table[m:, :nx] + table[:m, :nx]
        return np.clip(out / (size0 / ds) ** 2, 0.0, 1.0, out=out)

    def _integral_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique, in ``[0, h]``) of :meth:`integral`, the same
        integers, without the whole table when it is not cached: the column sums of the mask
        between consecutive rows (one pass over the mask), accumulated, then summed along
        each row. A lattice needs 2-4 rows per patch row, so this is a few percent of the
        table's work."""
        if self._integral is not None:
            return self._integral[rows]
        h, w = self.mask.shape
        dtype = np.int32 if h * w < 2**31 else np.int64
        out = np.zeros((len(rows), w + 1), dtype=dtype)
        prev = 0  # out[j, 1:]: the column sums of mask rows [0, rows[j])
        for j, r in enumerate(rows.tolist()):
            if r > prev:
                above = out[j - 1, 1:] if j else 0
                np.add(above, self.mask[prev:r].sum(axis=0, dtype=dtype), out=out[j, 1:])
                prev = r
        np.cumsum(out[:, 1:], axis=1, out=out[:, 1:])
        return out


def _interp_weights(u: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index and weight of the linear interpolation at ``u`` (clipped to ``[0, n]``) in a
    summed-area axis of ``n`` pixels (``n + 1`` entries)."""
    u = np.clip(u, 0.0, n)
    i = np.minimum(np.floor(u).astype(np.int64), max(n - 1, 0))
    return i, u - i


def _describe(method: str, rule: str, threshold: float, reason: str = "") -> str:
    """"auto: unimodal histogram → absolute rule, saturation ≥ 0.07" and the like."""
    if rule == "none":
        return "method none: tissue detection off, every patch is tissue"
    if math.isnan(threshold):  # a mask built by hand: nothing recorded
        return method
    if math.isinf(threshold):
        how = "uniform thumbnail, nothing above the saturation floor"
    elif rule == "absolute":
        how = f"absolute rule, saturation ≥ {threshold:.2f}"
    elif rule == "otsu":
        how = f"Otsu, saturation > {threshold:.2f}"
    else:
        how = f"saturation > {threshold:.2f}"
    if method == "auto":
        return f"auto: {reason} → {how}" if reason else f"auto: {how}"
    return f"{method}: {how}"


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 (h, w, 3) image (0 for black pixels)."""
    return _max_and_saturation(rgb)[1]


def _max_and_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max RGB (HSV value, uint8 for uint8 input) and HSV saturation (float32) of ``rgb``.

    Channel-wise ``np.maximum``/``np.minimum`` instead of reductions over the last axis: the
    same float32 values as ``(max - min) / max``, several times faster on a 2048² thumbnail.
    """
    rgb = np.asarray(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    num = np.subtract(mx, mn, dtype=np.float32)
    den = mx.astype(np.float32)
    sat = np.zeros(mx.shape, dtype=np.float32)
    np.divide(num, den, out=sat, where=den > 0)
    return mx, sat


def _threshold(sat: np.ndarray, params: TissueParams) -> float:
    if params.method == "fixed":
        return params.min_saturation
    if float(sat.max()) - float(sat.min()) < 1e-6:
        # A uniform image has no two classes; Otsu is meaningless there.
        return float("inf") if float(sat.max()) <= params.min_saturation else params.min_saturation
    from skimage.filters import threshold_otsu

    return max(float(threshold_otsu(sat)), params.min_saturation)


def _otsu_hist(hist: np.ndarray) -> tuple[int, float, float] | None:
    """Otsu on a histogram of saturation over [0, 1]: ``(last bin of the lower class, lower
    class mean, upper class mean)``, or ``None`` when fewer than two bins are occupied."""
    p = hist.astype(np.float64)
    centres = (np.arange(len(p)) + 0.5) / len(p)
    w0 = np.cumsum(p)
    w1 = w0[-1] - w0
    s0 = np.cumsum(p * centres)
    s1 = s0[-1] - s0
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        m0 = np.where(valid, s0 / w0, 0.0)
        m1 = np.where(valid, s1 / w1, 0.0)
    between = np.where(valid, w0 * w1 * (m1 - m0) ** 2, -1.0)
    k = int(np.argmax(between))
    return k, float(m0[k]), float(m1[k])


_SAT_TABLES: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []


def _saturation_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables over every ``(max << 8) | min`` key (built once per process):

    - float32 saturation, computed exactly as :func:`_max_and_saturation` computes it per
      pixel (the same float32 division), so a lookup gives the same values bit for bit;
      impossible keys (min > max) are 0;
    - uint8 histogram bin of that saturation (as :func:`_auto_rule` bins it);
    - bool "lit": max RGB at least ``ABSOLUTE_MIN_VALUE``.
    """
    if not _SAT_TABLES:
        keys = np.arange(1 << 16)
        mx, mn = (keys >> 8).astype(np.uint8), (keys & 0xFF).astype(np.uint8)
        num = np.subtract(mx, mn, dtype=np.float32)
        den = mx.astype(np.float32)
        lut = np.zeros(keys.shape, dtype=np.float32)
        np.divide(num, den, out=lut, where=(den > 0) & (mn <= mx))
        bins = np.minimum((lut * _HIST_BINS).astype(np.intp), _HIST_BINS - 1).astype(np.uint8)
        lit = mx >= ABSOLUTE_MIN_VALUE
        for table in (lut, bins, lit):
            table.setflags(write=False)
        _SAT_TABLES.append((lut, bins, lit))
    return _SAT_TABLES[0]


def _max_min_keys(rgb: np.ndarray) -> np.ndarray:
    """uint16 ``(max RGB << 8) | min RGB`` of a uint8 (h, w, 3+) image: saturation and value
    of each pixel in one small integer, for table lookups. The channels are first copied into
    three contiguous planes: the max/min then run on contiguous memory (faster than on the
    interleaved channels, whose stride is 3 bytes)."""
    h, w = rgb.shape[:2]
    planes = np.ascontiguousarray(rgb[..., :3]).reshape(-1, 3).T.copy()
    r, g, b = planes
    key = np.maximum(np.maximum(r, g), b).astype(np.uint16)
    key <<= 8
    key |= np.minimum(np.minimum(r, g), b)
    return key.reshape(h, w)


def _byte_histogram(values: np.ndarray) -> np.ndarray:
    """``np.bincount(values, minlength=256)`` of a uint8 array, counting byte *pairs* as uint16
    keys (half the elements, and neighbouring equal bytes no longer update one counter in a
    chain): the same counts, faster."""
    flat = np.ascontiguousarray(values).ravel()
    if flat.size < 1 << 14:
        return np.bincount(flat, minlength=256)
    even = flat[: flat.size & ~1]
    pairs = np.bincount(even.view(np.uint16), minlength=1 << 16).reshape(256, 256)
    hist = pairs.sum(axis=0) + pairs.sum(axis=1)  # each pair counts its two bytes
    if flat.size & 1:
        hist[flat[-1]] += 1
    return hist


def _auto_rule_uint8(rgb: np.ndarray, params: TissueParams) -> tuple[np.ndarray, float, str, str]:
    """:func:`_auto_rule` for a uint8 image, through tables over the 65,536 (max, min) pairs:
    the histogram is a bincount of each pixel's bin (one uint8 lookup), and the pixel rule one
    boolean lookup per pixel. The same masks, thresholds and rules bit for bit, without a
    float image."""
    key = _max_min_keys(rgb)
    lut, bins, lit = _saturation_tables()
    # ndarray.take: the same gather as fancy indexing, about 2.5x faster for these sizes
    stats = _otsu_hist(_byte_histogram(bins.take(key)))
    if stats is not None:
        k, m0, m1 = stats
        if m0 < AUTO_GLASS_MAX_SATURATION and m1 - m0 >= AUTO_MIN_SEPARATION:
            thr = max((k + 1) / _HIST_BINS, params.min_saturation)
            return ((lut > thr) & lit).take(key), thr, "otsu", "bimodal histogram"
    thr = max(ABSOLUTE_SATURATION, params.min_saturation)
    return ((lut >= thr) & lit).take(key), thr, "absolute", "unimodal histogram"


def _auto_rule(
    sat: np.ndarray, value: np.ndarray, params: TissueParams
) -> tuple[np.ndarray, float, str, str]:
    """Method "auto": ``(raw mask, threshold, rule, reason)``; see the module docstring."""
    idx = (sat * _HIST_BINS).astype(np.intp)
    np.minimum(idx, _HIST_BINS - 1, out=idx)
    stats = _otsu_hist(np.bincount(idx.ravel(), minlength=_HIST_BINS))
    lit = value >= ABSOLUTE_MIN_VALUE
    if stats is not None:
        k, m0, m1 = stats
        if m0 < AUTO_GLASS_MAX_SATURATION and m1 - m0 >= AUTO_MIN_SEPARATION:
            thr = max((k + 1) / _HIST_BINS, params.min_saturation)
            return (sat > thr) & lit, thr, "otsu", "bimodal histogram"
    thr = max(ABSOLUTE_SATURATION, params.min_saturation)
    return (sat >= thr) & lit, thr, "absolute", "unimodal histogram"


def _area_px(area_um2: float | None, mpp: float | None, downsample: float) -> float | None:
    """Convert a level-0 area in µm² into thumbnail pixels (None if not convertible)."""
    if area_um2 is None or mpp is None:
        return None
    return float(area_um2) / (mpp * downsample) ** 2


def _disk(radius: int) -> np.ndarray:
    """Disk structuring element ``x² + y² <= radius²`` (``skimage.morphology.disk``'s)."""
    r = int(radius)
    yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy) <= r * r


class _CrossMorph:
    """Dilations and erosions by the 3x3 cross (= ``disk(1)``) of one (h, w) mask, outside the
    image counting as 0 (scipy's default), as shifts of a *flat* array: each row is followed by
    one guard column that stays False, so a pixel's left and right neighbours are the flat
    array's previous and next elements (the guard stands for outside at the row ends) and the
    upper and lower ones are ``w + 1`` elements away. Every step is four contiguous 1-D boolean
    operations, several times faster than the same shifts on a 2-D array."""

    def __init__(self, m: np.ndarray, pad: int = 0) -> None:
        h, w = m.shape
        self.shape = (h + 2 * pad, w + 2 * pad)
        self.stride = self.shape[1] + 1
        buf = np.zeros((self.shape[0], self.stride), dtype=bool)
        buf[pad : pad + h, pad : pad + w] = m
        self.flat = buf.ravel()

    def dilate(self) -> None:
        f, s = self.flat, self.stride
        out = f.copy()
        out[1:] |= f[:-1]
        out[:-1] |= f[1:]
        out[s:] |= f[:-s]
        out[:-s] |= f[s:]
        out.reshape(-1, s)[:, -1] = False  # the guard column
        self.flat = out

    def erode(self) -> None:
        f, s = self.flat, self.stride
        out = f.copy()
        out[1:] &= f[:-1]  # the guard (False) erodes the first and last column
        out[:-1] &= f[1:]
        out[s:] &= f[:-s]
        out[:-s] &= f[s:]
        out[:s] = False  # first and last row: their outer neighbour is outside
        out[-s:] = False
        self.flat = out

    def image(self, crop: int = 0) -> np.ndarray:
        m = self.flat.reshape(-1, self.stride)[:, :-1]
        if crop:
            m = m[crop:-crop, crop:-crop]
        return np.ascontiguousarray(m)


def _closing(m: np.ndarray, r: int) -> np.ndarray:
    """``scipy.ndimage.binary_closing(m, disk(r))``. ``disk(1)`` is the cross and ``disk(2)``
    the cross dilated by itself, so radii 1 and 2 are done as 1 or 2 cross steps with
    shifted boolean operations (:class:`_CrossMorph`: the same pixels, several times faster);
    other radii go to scipy."""
    if r <= 2:
        return _close_open_cross(m, r, 0, 0)
    from scipy import ndimage as ndi

    return ndi.binary_closing(m, structure=_disk(r))


def _opening(m: np.ndarray, r: int) -> np.ndarray:
    """``scipy.ndimage.binary_opening(m, disk(r))``; radii 1 and 2 as cross steps."""
    if r <= 2:
        return _close_open_cross(m, 0, 0, r)
    from scipy import ndimage as ndi

    return ndi.binary_opening(m, structure=_disk(r))


def _close_open_cross(m: np.ndarray, close_r: int, close_pad: int, open_r: int) -> np.ndarray:
    """Closing by ``disk(close_r)`` of ``m`` padded by ``close_pad`` False pixels (cropped back
    after it), then opening by ``disk(open_r)``, radii 0 to 2, as cross steps."""
    morph = _CrossMorph(m, close_pad)
    for _ in range(close_r):
        morph.dilate()
    for _ in range(close_r):
        morph.erode()
    if open_r and close_pad:
        morph = _CrossMorph(morph.image(close_pad))
        close_pad = 0
    if open_r and not morph.flat.any():
        return morph.image(close_pad)
    for _ in range(open_r):
        morph.erode()
    for _ in range(open_r):
        morph.dilate()
    return morph.image(close_pad)


def _close_open(mask: np.ndarray, params: TissueParams) -> np.ndarray:
    close_r, open_r = params.close_radius, params.open_radius
    if not mask.any():
        return mask
    if 0 <= close_r <= 2 and 0 <= open_r <= 2:
        # Padded so that closing does not glue tissue to the image border.
        return _close_open_cross(mask, close_r, close_r, open_r)
    if close_r > 0:
        padded = np.pad(mask, close_r)
        mask = _closing(padded, close_r)[close_r:-close_r, close_r:-close_r]
    if open_r > 0 and mask.any():
        mask = _opening(mask, open_r)
    return mask


def _component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """``np.bincount(labels.ravel(), minlength=n + 1)`` (pixels per label), counted by runs of
    equal labels in raster order when there are few: a labelled mask is long runs of one
    label, and bincount updates one counter per pixel in a dependency chain there."""
    flat = labels.ravel()
    if flat.size < 1 << 12:
        return np.bincount(flat, minlength=n + 1)
    starts = np.flatnonzero(flat[1:] != flat[:-1])
    if starts.size > flat.size // 8:  # short runs: bincount is as fast
        return np.bincount(flat, minlength=n + 1)
    starts += 1
    lengths = np.diff(starts, prepend=0, append=flat.size)
    values = np.concatenate([flat[:1], flat[starts]])
    return np.bincount(values, weights=lengths, minlength=n + 1).astype(np.int64)


def _min_area_px(params: TissueParams, mpp: float | None, downsample: float) -> float:
    min_px = float(params.min_area_px)
    um_px = _area_px(params.min_area_um2, mpp, downsample)
    return max(min_px, um_px) if um_px is not None else min_px


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    from scipy import ndimage as ndi

    if mask.any() and min_px > 1:
        labels, n = ndi.label(mask)
        keep = _component_sizes(labels, n) >= min_px
        keep[0] = False
        if not keep[1:].all():  # else every component stays: the mask as it is
            mask = keep.take(labels)
    return mask


def clean_mask(
    raw: np.ndarray, params: TissueParams, mpp: float | None, downsample: float
) -> np.ndarray:
    """Morphological clean-up of a raw thresholded mask (close, open, size filter, holes);
    methods "otsu" and "fixed"."""
    from scipy import ndimage as ndi

    mask = _close_open(raw.astype(bool), params)
    mask = _drop_small(mask, _min_area_px(params, mpp, downsample))
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


def clean_mask_auto(
    raw: np.ndarray, params: TissueParams, mpp: float | None, downsample: float
) -> np.ndarray:
    """Clean-up of method "auto": close, open, fill holes *and* border pockets smaller than
    ``max_hole_area_um2`` (without mpp or without that limit: every enclosed hole, no pocket),
    then drop components smaller than the minimum area (measured with their holes filled)."""
    from scipy import ndimage as ndi

    mask = _close_open(np.asarray(raw, dtype=bool), params)
    if params.fill_holes and mask.any() and not mask.all():
        background, n = ndi.label(~mask)
        hole_px = _area_px(params.max_hole_area_um2, mpp, downsample)
        if hole_px is None:
            fill = np.ones(n + 1, dtype=bool)
            for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
                fill[edge] = False
        else:
            fill = _component_sizes(background, n) < hole_px
        fill[0] = False
        if fill.any():
            mask = mask | fill.take(background)
    return _drop_small(mask, _min_area_px(params, mpp, downsample))


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
    """Detect tissue on a thumbnail of ``slide`` (see the module docstring for the methods).

    Never raises for a blank slide: the returned mask is then empty (``is_empty``); callers
    that need tissue raise :class:`NoTissueError` with :func:`no_tissue_message`. Method
    "none" reads no pixels: the mask is the whole image.
    """
    params = params or TissueParams()
    if params.method == "none":
        return whole_image_mask(slide, params)
    mpp = getattr(slide, "mpp", None)
    side = params.mask_side(slide.level_dimensions[0], mpp, list(slide.level_dimensions))
    thumb, downsample = slide.thumbnail_with_downsample(side)
    thumb = np.asarray(thumb)
    if thumb.ndim == 2:
        thumb = np.stack([thumb] * 3, axis=-1)
    ds = float(downsample)
    if params.method == "auto":
        if thumb.dtype == np.uint8 and thumb.ndim == 3 and thumb.shape[-1] >= 3:
            raw, thr, rule, reason = _auto_rule_uint8(thumb, params)
        else:
            value, sat = _max_and_saturation(thumb)
            raw, thr, rule, reason = _auto_rule(sat, value, params)
        mask = clean_mask_auto(raw, params, mpp, ds)
        return TissueMask(mask=mask, downsample=ds, params=params, threshold=thr, rule=rule,
                          reason=reason)  # fmt: skip
    sat = saturation(thumb)
    thr = _threshold(sat, params)
    mask = clean_mask(sat > thr, params, mpp, ds)
    return TissueMask(mask=mask, downsample=ds, params=params, threshold=thr, rule=params.method)


def whole_image_mask(slide: _ThumbnailSource, params: TissueParams | None = None) -> TissueMask:
    """Method "none": every pixel of the slide is tissue (no pixel is read). The mask covers
    level 0 (one mask pixel per ``downsample`` level-0 px, rounded up), its one polygon is the
    level-0 rectangle."""
    params = params or TissueParams(method="none")
    w0, h0 = (int(v) for v in slide.level_dimensions[0])
    ds = max(1.0, max(w0, h0) / params.thumbnail_max_side)
    shape = (max(1, math.ceil(h0 / ds - 1e-9)), max(1, math.ceil(w0 / ds - 1e-9)))
    rect = np.array([[0, 0], [w0, 0], [w0, h0], [0, h0], [0, 0]], dtype=np.float64)
    return TissueMask(mask=np.ones(shape, dtype=bool), downsample=ds, params=params,
                      polygons=[TissuePolygon(exterior=rect)], tissue_fraction=1.0,
                      rule="none")  # fmt: skip


_WHOLE_IMAGE_ADVICE = (
    "use the whole image: `--tissue-method none` (napari-gpfm embed), \"Whole image\" under "
    "Tissue in the GPFM dock, or TissueParams(method='none')"
)


def no_tissue_message(
    slide_path: Any,
    params: TissueParams,
    detail: str = "",
    *,
    tissue: TissueMask | None = None,
    min_tissue: float | None = None,
) -> str:
    """Error text for a slide without usable tissue: the slide, what was tried, and advice that
    works.

    Args:
        slide_path: the slide (named first).
        params: the tissue parameters used.
        detail: what went wrong, when not simply "no tissue found".
        tissue: the mask found, if any (its :attr:`TissueMask.summary` says what was tried).
        min_tissue: set when tissue was found but no patch reached this tissue fraction; then
            ``--min-tissue`` is the real cause and is named (also when ``detail`` mentions
            ``min_tissue``).
    """
    tried = tissue.how if tissue is not None else _describe_params(params)
    patch_cause = min_tissue is not None or "min_tissue" in detail
    if patch_cause:
        what = detail or (f"tissue was found but no patch holds at least "
                          f"min_tissue={min_tissue:g} of it")  # fmt: skip
        found = tissue.summary if tissue is not None else f"tried {tried}"
        limit = f" (now {min_tissue:g})" if min_tissue is not None else ""
        return (
            f"{slide_path}: {what}; {found}. The tissue pieces are smaller or thinner than a "
            f"patch: lower --min-tissue{limit}, or {_WHOLE_IMAGE_ADVICE}. Settings: {params!r}."
        )
    what = detail or "no tissue found"
    text = (
        f"{slide_path}: {what} (tried {tried}). If this image is all tissue (a crop, an ROI "
        f"export, a TMA core or a biopsy), {_WHOLE_IMAGE_ADVICE}."
    )
    if params.method in ("otsu", "fixed"):
        text += (" Or let napari-gpfm choose the threshold: `--tissue-method auto` (\"Auto\" in "
                 "the dock), which handles all-tissue images.")  # fmt: skip
    return f"{text} Otherwise the slide holds no stained tissue (glass). Settings: {params!r}."


def _describe_params(params: TissueParams) -> str:
    """What ``params`` try, for a message written without the mask."""
    floor = params.min_saturation
    if params.method == "auto":
        return (f"auto: Otsu on saturation when its histogram is bimodal, else the absolute "
                f"rule, saturation ≥ {max(ABSOLUTE_SATURATION, floor):.2f}")  # fmt: skip
    if params.method == "otsu":
        return f"otsu: Otsu on saturation, at least {floor:.2f}"
    if params.method == "fixed":
        return f"fixed: saturation > {floor:.2f}"
    return "method none: tissue detection off, every patch is tissue"
