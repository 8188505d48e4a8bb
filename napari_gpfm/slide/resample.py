"""Regions at any pyramid level, rendered exactly as OpenSlide's ``read_region`` renders them.

``Slide.read_region(x, y, level, w, h)`` takes level-0 coordinates. At a level whose downsample
``ds`` is not an integer (2.0003 for a 2220×2967 slide halved to 1110×1483, 4.016 for OpenSlide's
``boxes.tiff``), ``x / ds`` falls between two pixels of that level. Picking one of them (``floor``,
``round``) is not what OpenSlide does, and embeddings cut there would differ from those of tools
built on OpenSlide (TRIDENT, CLAM). OpenSlide (4.0, ``src/openslide.c`` ``read_region_area`` and
``src/openslide-grid.c``) paints each native tile onto a cairo surface translated by
``-(x / ds)`` (fractional), with the operator SATURATE. What that produces, step by step (cairo
1.18 and pixman 0.46 as bundled by ``openslide-bin``):

1. Regions larger than 4096 px are painted in 4096-px chunks, each starting at level-0
   ``int(x + k * 4096 * ds)``. Negative ``x`` (or ``y``) starts the painting at 0 and shifts the
   output by ``int(-x / ds)`` pixels.
2. When ``x / ds`` and ``y / ds`` are both whole, the tiles are copied (pixman NEAREST).
3. Otherwise cairo's GOOD filter is reduced to BILINEAR (the scale is 1), and because SATURATE
   "needs division", pixman composites in its float pipeline: pixels are expanded to float32
   (``c * (1/255.f)``), interpolated with float32 weights from the 16.16 fixed-point sample
   position, combined with ``min(1, s * clamp((1 - da) / sa) + d)`` and stored back as
   ``(uint)(f * 256) - carry``. The result is the source value times a bit more than the exact
   bilinear weight (the 256/255 of the store), truncated: no "pick a pixel" rule reproduces it.
4. Each tile is painted separately (the last tile first), with the pixels outside it
   transparent, so a sample straddling two tiles is the SATURATE sum of two partial samples,
   stored to 8 bits in between.
5. The result is premultiplied ARGB; openslide-python un-premultiplies it with
   ``255 * c // a`` (kept in 8 bits).

This module reproduces those steps with numpy float32 (IEEE single precision, the same
operations in the same order), so the pixels are OpenSlide's bit for bit on the simple tile
grids (generic tiled TIFF, Aperio SVS, DICOM), checked against OpenSlide on real files in
``tests/slide/test_openslide_parity.py``. Where OpenSlide returns transparent pixels (outside
the image), the slide's background (white) is returned instead.

Limits: the reference is OpenSlide as ``openslide-bin`` 4.0.1 builds it; an OpenSlide linked to
another cairo/pixman may round differently. Vendors whose OpenSlide driver positions regions
otherwise (Leica SCN truncates ``x / ds``; NDPI and MIRAX use their own tile grids; Aperio
rebuilds missing tiles from a lower level) can differ at tile seams or by that positioning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["CHUNK", "render_region"]

#: OpenSlide paints regions in squares of at most this many pixels of the level.
CHUNK = 4096

_F32 = np.float32
_ONE = _F32(1)
_ZERO = _F32(0)
_INV255 = _F32(1) / _F32(255)  # pixman_expand_to_float: 1.0f / ((1 << 8) - 1)
_FLT_MIN = np.finfo(np.float32).tiny

# fetch(x0, y0, x1, y1) -> uint8 RGB (y1 - y0, x1 - x0, 3) of the level, for an in-bounds window.
Fetch = Callable[[int, int, int, int], np.ndarray]


def render_region(
    fetch: Fetch,
    level_size: tuple[int, int],
    tile_size: tuple[int, int],
    x: int,
    y: int,
    downsample: float,
    width: int,
    height: int,
    background: int = 255,
) -> np.ndarray:
    """OpenSlide's ``read_region((x, y), level, (width, height))`` as uint8 RGB (height, width, 3).

    ``level_size`` and ``tile_size`` are the level's (width, height) and its native tile grid;
    ``downsample`` is the level's downsample as OpenSlide computes it. Pixels OpenSlide leaves
    transparent (outside the image) are ``background``.
    """
    x, y, width, height = int(x), int(y), int(width), int(height)
    argb = np.zeros((height, width, 4), np.uint8)
    for row in range((height + CHUNK - 1) // CHUNK):
        for col in range((width + CHUNK - 1) // CHUNK):
            sx = int(x + col * CHUNK * downsample)  # OpenSlide: int64 = int64 + double
            sy = int(y + row * CHUNK * downsample)
            sw = min(width - col * CHUNK, CHUNK)
            sh = min(height - row * CHUNK, CHUNK)
            argb[row * CHUNK : row * CHUNK + sh, col * CHUNK : col * CHUNK + sw] = _render_area(
                fetch, level_size, tile_size, sx, sy, downsample, sw, sh
            )
    return _unpremultiply(argb, background)


# ---------------------------------------------------------------------------- one area
def _render_area(fetch, level_size, tile_size, x, y, ds, w, h) -> np.ndarray:
    """openslide.c ``read_region_area`` + openslide-grid.c ``simple_paint_region``: premultiplied
    RGBA uint8 (h, w, 4)."""
    out = np.zeros((h, w, 4), np.uint8)
    lw, lh = level_size
    tw, th = tile_size
    shift_x = shift_y = 0
    if x < 0:
        shift_x = int((-x) / ds)
        x = 0
        w -= shift_x
    if y < 0:
        shift_y = int((-y) / ds)
        y = 0
        h -= shift_y
    if w <= 0 or h <= 0:
        return out
    fx, fy = x / ds, y / ds  # the region's top-left in the level, fractional
    start_x, start_y = int(fx / tw), int(fy / th)
    end_x, end_y = math.ceil((fx + w) / tw), math.ceil((fy + h) / th)
    tiles_x, tiles_y = -(-lw // tw), -(-lh // th)
    if end_x <= 0 or end_y <= 0 or start_x > tiles_x - 1 or start_y > tiles_y - 1:
        return out
    off_x = fx - start_x * tw
    off_y = fy - start_y * th
    dest = out[shift_y:, shift_x:]
    if off_x == math.floor(off_x) and off_y == math.floor(off_y):
        _copy(fetch, lw, lh, int(fx), int(fy), dest)
    else:
        _bilinear(fetch, lw, lh, tw, th, start_x * tw, start_y * th, off_x, off_y,
                  shift_x, shift_y, dest)  # fmt: skip
    return out


def _copy(fetch, lw, lh, u, v, dest) -> None:
    """Whole-pixel translation: cairo hands pixman a translation, the tiles are copied."""
    h, w = dest.shape[:2]
    x0, y0, x1, y1 = max(u, 0), max(v, 0), min(u + w, lw), min(v + h, lh)
    if x1 > x0 and y1 > y0:
        dest[y0 - v : y1 - v, x0 - u : x1 - u, :3] = fetch(x0, y0, x1, y1)
        dest[y0 - v : y1 - v, x0 - u : x1 - u, 3] = 255


def _sample_axis(offset: float, shift: int) -> tuple[int, np.float32]:
    """First bilinear tap (relative to the first tile) and its float weight along one axis.

    The tile is painted at device translation ``shift - offset``; the pattern matrix is the
    inverse; cairo moves ``floor(-x0 / 2)`` whole pixels into pixman's source offset and
    converts the rest to 16.16 fixed point (round to nearest, ties to even); pixman samples
    device pixel ``j`` at ``(j - n + 0.5) + fixed`` and bilinear subtracts 0.5.
    """
    x0 = -((0.0 - offset) + shift)
    n = math.floor(-x0 / 2)
    fixed = int(round((x0 + n) * 65536.0))
    first = (shift - n) * 65536 + fixed  # x1 = position - 1/2, for device pixel `shift`
    return first >> 16, _F32(first & 0xFFFF) / _F32(65536)


def _bilinear(fetch, lw, lh, tw, th, tile_x0, tile_y0, off_x, off_y, shift_x, shift_y, dest):
    h, w = dest.shape[:2]
    tap_x, dx = _sample_axis(off_x, shift_x)
    tap_y, dy = _sample_axis(off_y, shift_y)
    cx, cy = tile_x0 + tap_x, tile_y0 + tap_y  # level coordinates of the first top-left tap
    one_dx, one_dy = _ONE - dx, _ONE - dy
    w_xy, w_xiy, w_ixy, w_ixiy = dx * dy, dx * one_dy, one_dx * dy, one_dx * one_dy
    # the source window: taps cx .. cx + w (inclusive), zero (transparent) outside the image
    x0, y0 = max(cx, 0), max(cy, 0)
    x1, y1 = min(cx + w + 1, lw), min(cy + h + 1, lh)
    if (x0, y0, x1, y1) == (cx, cy, cx + w + 1, cy + h + 1):  # all inside: opaque, one alpha
        src = np.asarray(fetch(x0, y0, x1, y1)).astype(_F32) * _INV255
        sa = ((w_ixiy + w_xiy) + w_ixy) + w_xy  # the alpha sum (1 * w is w)
        fa = _ONE if abs(sa) < _FLT_MIN else min(max((_ONE - _ZERO) / sa, _ZERO), _ONE)
        tl, tr, bl, br = src[:-1, :-1], src[:-1, 1:], src[1:, :-1], src[1:, 1:]
        s = ((tl * w_ixiy + tr * w_xiy) + bl * w_ixy) + br * w_xy
        dest[..., :3] = _store(np.minimum(_ONE, s * fa))
        dest[..., 3] = _store(np.minimum(_ONE, np.asarray(sa * fa, _F32)))
        src4 = None
    else:
        src4 = np.zeros((h + 1, w + 1, 4), _F32)
        if x1 > x0 and y1 > y0:
            window = src4[y0 - cy : y1 - cy, x0 - cx : x1 - cx]
            window[..., :3] = np.asarray(fetch(x0, y0, x1, y1)).astype(_F32) * _INV255
            window[..., 3] = _ONE
        # pixman bilinear_interpolation_float: four weights, one sum in this order
        tl, tr, bl, br = src4[:-1, :-1], src4[:-1, 1:], src4[1:, :-1], src4[1:, 1:]
        s = ((tl * w_ixiy + tr * w_xiy) + bl * w_ixy) + br * w_xy
        dest[:] = _store(_saturate(s, np.zeros_like(s)))
    # samples straddling two tiles: each tile painted alone (last first), 8-bit in between
    seam_x = ((cx + np.arange(w)) % tw) == tw - 1
    seam_y = ((cy + np.arange(h)) % th) == th - 1
    if not (seam_x.any() or seam_y.any()):
        return
    rows, cols = np.nonzero(seam_y[:, None] | seam_x[None, :])
    sx, sy = seam_x[cols][:, None], seam_y[rows][:, None]
    if src4 is None:  # opaque window: add the alpha plane for the per-tile sums
        src4 = np.concatenate([src, np.ones(src.shape[:2] + (1,), _F32)], axis=2)
        tl, tr, bl, br = src4[:-1, :-1], src4[:-1, 1:], src4[1:, :-1], src4[1:, 1:]
    taps = {(0, 0): tl[rows, cols], (0, 1): tr[rows, cols], (1, 0): bl[rows, cols],
            (1, 1): br[rows, cols]}  # fmt: skip
    weights = {(0, 0): w_ixiy, (0, 1): w_xiy, (1, 0): w_ixy, (1, 1): w_xy}
    d = np.zeros((len(rows), 4), _F32)
    last = None
    for gy, gx in ((1, 1), (1, 0), (0, 1), (0, 0)):  # tiles painted bottom-right first
        part = None
        for (a, b), tap in taps.items():
            mine = ((sy if a else False) == bool(gy)) & ((sx if b else False) == bool(gx))
            term = np.where(mine, tap, _ZERO) * weights[(a, b)]
            part = term if part is None else part + term
        last = _store(_saturate(part, d))
        d = last.astype(_F32) * _INV255
    dest[rows, cols] = last


def _saturate(s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """pixman combine_saturate_u_float: ``min(1, s * clamp((1 - da) / sa) + d * 1)``."""
    sa, da = s[..., 3:4], d[..., 3:4]
    tiny = np.abs(sa) < _FLT_MIN
    with np.errstate(divide="ignore", invalid="ignore"):
        fa = (_ONE - da) / np.where(tiny, _ONE, sa)
    fa = np.where(tiny, _ONE, np.clip(fa, _ZERO, _ONE))
    return np.minimum(_ONE, s * fa + d * _ONE)


def _store(f: np.ndarray) -> np.ndarray:
    """pixman float_to_unorm(f, 8) of a value in [0, 1]: ``u = (uint)(f * 256); u -= u >> 8``."""
    u = (f * _F32(256)).astype(np.int32)
    u -= u >> 8
    return u.astype(np.uint8)


def _unpremultiply(argb: np.ndarray, background: int) -> np.ndarray:
    """openslide-python ``argb2rgba`` (``255 * c // a`` in 8 bits); transparent → background."""
    if argb.size and argb[..., 3].min() == 255:  # opaque everywhere: nothing to undo
        return np.ascontiguousarray(argb[..., :3])
    a = argb[..., 3:4].astype(np.int32)
    c = argb[..., :3].astype(np.int32)
    partial = (a != 255) & (a != 0)
    rgb = np.where(partial, (255 * c // np.maximum(a, 1)) & 255, c)
    rgb = np.where(a == 0, background, rgb)
    return rgb.astype(np.uint8)
