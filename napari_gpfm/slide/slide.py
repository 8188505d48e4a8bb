"""``Slide``: one whole-slide image as pyramid levels, read by native tiles through a shared cache.

Coordinates follow OpenSlide's convention: ``x, y`` are level-0 pixels (top-left), sizes are in
pixels of the level being read. ``mpp`` is microns per level-0 pixel, or ``None`` when the file
does not record it (never guessed).

:meth:`Slide.read_region` returns OpenSlide's pixels for the same arguments at every level: at a
level whose downsample is not a whole number, level-0 ``x`` falls between two of the level's
pixels, and OpenSlide interpolates there; :mod:`napari_gpfm.slide.resample` reproduces its
arithmetic from the native tiles (or the OpenSlide backend asks OpenSlide itself).
:class:`LevelArray` (napari's view) serves the levels' own pixels, untouched.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .backends.base import LevelInfo, SlideBackend, pyramid_downsample
from .cache import TileCache
from .errors import ImplausibleMppWarning, MissingMppError, SlideReadWarning, TileReadError
from .mpp import implausible_file_mpp_message, validate_mpp
from .resample import render_region

# Virtual levels (each half the size of the one before, computed tile by tile from it) are
# added below the smallest stored level down to this size: for a slide without a pyramid, and
# for a pyramid whose smallest stored level is larger than VIRTUAL_PYRAMID_MIN_SIDE (napari's
# first draw and the thumbnail then never read a large level whole).
VIRTUAL_LEVEL_MIN_SIDE = 2048
VIRTUAL_PYRAMID_MIN_SIDE = 8192
VIRTUAL_TILE = 512
BACKGROUND = 255
# A thumbnail's source level up to this size is read at once; a larger one is reduced chunk by
# chunk (THUMBNAIL_CHUNK level pixels a side), never decoded whole.
THUMBNAIL_DIRECT_BYTES = 192 * 2**20
THUMBNAIL_CHUNK = 2048

# Regions needing at least this many undecoded stored tiles decode them on DECODE_THREADS.
# (8, not 4: waking the threads for a 2 x 2 tile region, e.g. the 277 x 370 level the tissue
# mask of a small pyramid is made on, cost 7.4 ms against 1.9 ms decoding in line on the
# 2-core machine; patch reads measured the same either way. bench/bench_tissue.py.)
PARALLEL_TILES = 8
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))

_shared_cache = TileCache()
_uid_lock = threading.Lock()
_next_uid = 0
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor | None:
    """The process-wide tile-decoding threads (None with one CPU). Its tasks only decode
    stored tiles and never wait on the pool, so nested use cannot deadlock."""
    global _pool
    if DECODE_THREADS < 2:
        return None
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="napari-gpfm-decode")
        return _pool


def _forget_pool_in_child() -> None:
    """A forked child (a patch-loading worker) has none of the parent's threads: a fresh pool."""
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def shared_tile_cache() -> TileCache:
    """The process-wide native-tile cache used by every open slide."""
    return _shared_cache


def _new_uid() -> int:
    global _next_uid
    with _uid_lock:
        _next_uid += 1
        return _next_uid


def slide_name(backend: SlideBackend) -> str:
    """TRIDENT's slide name: the file name without its last extension (``case1.HE.svs`` →
    ``case1.HE``); a DICOM slide (a folder, or one ``.dcm`` instance of it) is named after its
    folder, since all the folder's instances make up the slide. A DICOM file in a folder
    holding several slides is named after the file (the backend's ``slide_name``)."""
    hint = getattr(backend, "slide_name", None)
    if isinstance(hint, str) and hint:
        return hint
    path = backend.path
    if backend.name == "wsidicom" and path.is_file():
        path = path.parent
    if path.is_dir():
        return path.name
    return os.path.splitext(path.name)[0]


@dataclass(frozen=True)
class _Level:
    info: LevelInfo
    source: int | None = None  # for a virtual level: the level it is computed from
    factor: int = 1  # for a virtual level: its source's pixels per pixel (per axis)


class Slide:
    """A whole-slide image. Create it with :func:`napari_gpfm.slide.open_slide`."""

    def __init__(
        self,
        backend: SlideBackend,
        mpp: float | None = None,
        cache: TileCache | None = None,
        _uid: int | None = None,
        mpp_given: str = "given with --mpp or open_slide(mpp=...)",
    ):
        self.backend = backend
        self.path = backend.path
        self.name = slide_name(backend)
        self.vendor = backend.vendor
        self.objective_power = backend.objective_power
        self.properties = dict(backend.properties)
        #: why the file's recorded pixel size was refused (None when it was not, or when the
        #: user gave one)
        self.mpp_note: str | None = None
        if mpp is not None:
            self.mpp: float | None = validate_mpp(mpp, self.path, mpp_given)
            self.mpp_source: str | None = "user"
        else:
            self.mpp = backend.mpp
            self.mpp_source = "file" if backend.mpp is not None else None
            self.mpp_note = getattr(backend, "mpp_note", None)
            if self.mpp is None and self.mpp_note and _uid is None:
                warnings.warn(
                    implausible_file_mpp_message(self.path, self.mpp_note),
                    ImplausibleMppWarning,
                    stacklevel=3,
                )
        self._cache = cache if cache is not None else _shared_cache
        self._uid = _uid if _uid is not None else _new_uid()
        self._fingerprint = None  # napari_gpfm.slide.identity.slide_fingerprint caches it here
        self._levels = [_Level(info) for info in backend.levels]
        self.has_native_pyramid = len(self._levels) > 1
        smallest = self._levels[-1].info
        if not self.has_native_pyramid or (
            max(smallest.width, smallest.height) > VIRTUAL_PYRAMID_MIN_SIDE
        ):
            self._add_virtual_levels()

    # ------------------------------------------------------------------ geometry
    def _add_virtual_levels(self) -> None:
        """Halve the smallest stored level until it falls under ``VIRTUAL_LEVEL_MIN_SIDE``;
        each virtual level is computed from the one above it, so one virtual tile never reads
        more than 2x2 tiles' worth (4 x 512² px) of its source."""
        base0 = self._levels[0].info
        last = len(self._levels) - 1
        stored = self._levels[last].info
        ds = 2
        while max(stored.width, stored.height) / ds >= VIRTUAL_LEVEL_MIN_SIDE:
            w, h = math.ceil(stored.width / ds), math.ceil(stored.height / ds)
            info = LevelInfo(
                w, h, VIRTUAL_TILE, VIRTUAL_TILE,
                pyramid_downsample((base0.width, base0.height), (w, h)),
            )  # fmt: skip
            self._levels.append(_Level(info, source=len(self._levels) - 1, factor=2))
            ds *= 2

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(lv.info.width, lv.info.height) for lv in self._levels]

    @property
    def level_downsamples(self) -> list[float]:
        return [lv.info.downsample for lv in self._levels]

    @property
    def level_tile_sizes(self) -> list[tuple[int, int]]:
        return [(lv.info.tile_width, lv.info.tile_height) for lv in self._levels]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level whose downsample does not exceed ``downsample`` (0.1 % tolerance)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.001:
                best = i if ds >= self.level_downsamples[best] else best
        return best

    # ------------------------------------------------------------------ mpp
    def with_mpp(self, mpp: float, source: str = "given to Slide.with_mpp") -> Slide:
        """The same slide with a user-given pixel size (µm/px at level 0). A value that cannot
        be a brightfield scan's (outside 0.05-20 µm/px, nan, inf) raises
        :class:`~napari_gpfm.slide.errors.ImplausibleMppError` (a ``ValueError``) naming the
        slide, the value and ``source``."""
        other = Slide(self.backend, mpp=mpp, cache=self._cache, _uid=self._uid, mpp_given=source)
        other._fingerprint = self._fingerprint  # same file: same fingerprint
        return other

    def require_mpp(self, action: str = "this operation") -> float:
        if self.mpp is None:
            raise MissingMppError(self.path, action, self.mpp_note)
        return self.mpp

    # ------------------------------------------------------------------ metadata
    @property
    def associated_names(self) -> list[str]:
        return self.backend.associated_names

    def associated_image(self, name: str) -> np.ndarray:
        return self.backend.associated_image(name)

    def metadata(self) -> dict:
        """Plain-data description, stored as napari layer metadata and in artefacts."""
        return {
            "path": str(self.path),
            "name": self.name,
            "vendor": self.vendor,
            "backend": self.backend.name,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "level_count": self.level_count,
            "level_dimensions": self.level_dimensions,
            "level_downsamples": self.level_downsamples,
            "native_pyramid": self.has_native_pyramid,
            "associated_images": self.associated_names,
            "properties": self.properties,
        }

    # ------------------------------------------------------------------ tiles
    def read_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        """One native tile (clipped to the level), decoded once and then served from the cache."""
        key = (self._uid, level, tx, ty)
        tile = self._cache.get(key)
        if tile is None:
            lv = self._levels[level]
            if lv.source is None:
                tile = self.backend.read_tile(level, tx, ty)
            else:
                tile = self._virtual_tile(lv, tx, ty)
            tile.setflags(write=False)
            self._cache.put(key, tile)
        return tile

    def _virtual_tile(self, lv: _Level, tx: int, ty: int) -> np.ndarray:
        """A tile of a virtual level: the ``factor``-times larger area of its source level
        (clipped to it at the right and bottom edges), box-averaged."""
        info = lv.info
        src = self._levels[lv.source].info
        f = lv.factor
        x, y = tx * info.tile_width, ty * info.tile_height
        w, h = min(info.tile_width, info.width - x), min(info.tile_height, info.height - y)
        sx, sy = x * f, y * f
        sw, sh = min(w * f, src.width - sx), min(h * f, src.height - sy)
        region = self._read_level_region(lv.source, sx, sy, sw, sh)
        if (sw, sh) == (w * f, h * f):  # exact f x f box means (what BOX does), faster
            return np.asarray(Image.fromarray(region).reduce(f))
        return np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.BOX))

    def _read_level_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A region in the coordinates of ``level`` itself; outside the image is background.
        Stored tiles not in the cache are decoded on the shared decode threads when there are
        several (the decoders release the GIL)."""
        info = self._levels[level].info
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, info.width), min(y + h, info.height)
        if x1 <= x0 or y1 <= y0:
            return out
        tw, th = info.tile_width, info.tile_height
        txs = range(x0 // tw, (x1 - 1) // tw + 1)
        tys = range(y0 // th, (y1 - 1) // th + 1)
        decoded: dict[tuple[int, int], np.ndarray] = {}
        if self._levels[level].source is None and len(txs) * len(tys) >= PARALLEL_TILES:
            missing = [(tx, ty) for ty in tys for tx in txs
                       if (self._uid, level, tx, ty) not in self._cache]  # fmt: skip
            pool = _decode_pool()
            if pool is not None and len(missing) >= PARALLEL_TILES:
                tiles = pool.map(lambda t: self.read_tile(level, t[0], t[1]), missing)
                decoded = dict(zip(missing, tiles))
        for ty in tys:
            for tx in txs:
                tile = decoded.get((tx, ty))
                if tile is None:
                    tile = self.read_tile(level, tx, ty)
                ox, oy = tx * tw, ty * th
                ax0, ay0 = max(x0, ox), max(y0, oy)
                ax1, ay1 = min(x1, ox + tile.shape[1]), min(y1, oy + tile.shape[0])
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[ay0 - oy : ay1 - oy, ax0 - ox : ax1 - ox]
        return out

    # ------------------------------------------------------------------ reading
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level``, top-left at level-0 pixel (x, y).

        The same pixels as OpenSlide's ``read_region((x, y), level, (width, height))`` on the
        same file (its interpolation where ``x / downsample`` falls between two pixels, see
        :mod:`napari_gpfm.slide.resample`); pixels outside the image are white.
        """
        x, y, width, height = int(x), int(y), int(width), int(height)
        if width < 0 or height < 0:
            raise ValueError(f"{self.path}: negative region size {width}×{height}")
        if not 0 <= level < self.level_count:
            raise IndexError(f"{self.path}: no level {level} (the slide has {self.level_count})")
        lv = self._levels[level]
        if lv.source is None:
            native = self.backend.read_region(x, y, level, width, height)
            if native is not None:
                return native
        info = lv.info
        return render_region(
            lambda x0, y0, x1, y1: self._read_level_region(level, x0, y0, x1 - x0, y1 - y0),
            (info.width, info.height),
            (info.tile_width, info.tile_height),
            x, y, info.downsample, width, height, BACKGROUND,
        )  # fmt: skip

    def read_patch(self, x: int, y: int, size0: int, out_size: int) -> np.ndarray:
        """The level-0 square at (x, y) of side ``size0``, read from the best level, resized to
        ``out_size`` (bicubic)."""
        level = self.best_level_for_downsample(size0 / out_size)
        ds = self.level_downsamples[level]
        side = max(1, round(size0 / ds))
        region = self.read_region(x, y, level, side, side)
        if side != out_size:
            region = np.asarray(
                Image.fromarray(region).resize((out_size, out_size), Image.Resampling.BICUBIC)
            )
        return region

    def read_patches(
        self,
        coords: Iterable[Sequence[int]],
        size0: int,
        out_size: int,
        threads: int = 2,
    ) -> np.ndarray:
        """Many patches (N, out, out, 3); decoding runs on ``threads`` threads (the decoders
        release the GIL), native tiles shared between neighbouring patches are decoded once."""
        coords = [(int(c[0]), int(c[1])) for c in coords]
        out = np.empty((len(coords), out_size, out_size, 3), np.uint8)

        def one(i: int) -> None:
            out[i] = self.read_patch(coords[i][0], coords[i][1], size0, out_size)

        if threads <= 1 or len(coords) < 2:
            for i in range(len(coords)):
                one(i)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(len(coords))))
        return out

    def thumbnail_with_downsample(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """A whole-slide overview no larger than ``max_side``, and its exact downsample
        (level-0 width / thumbnail width).

        Read from the level nearest the target size (the coarsest one not smaller than it).
        A level up to ``THUMBNAIL_DIRECT_BYTES`` is read at once; a larger one is box-resized
        chunk by chunk (the same pixels), so memory stays bounded whatever the pyramid. The
        result is kept in the tile cache: tissue detection after a preview reads it again.
        """
        w0, h0 = self.dimensions
        max_side = max(1, int(max_side))
        key = (self._uid, "thumbnail", max_side)
        cached = self._cache.get(key)  # tissue detection after a preview: computed once
        if cached is not None:
            return cached.copy(), w0 / cached.shape[1]
        target = max(w0, h0) / max_side
        level = self.best_level_for_downsample(max(target, 1.0))
        lw, lh = self.level_dimensions[level]
        tw, th = lw, lh
        if max(lw, lh) > max_side:
            scale = max_side / max(lw, lh)
            tw, th = max(1, round(lw * scale)), max(1, round(lh * scale))
        if lw * lh * 3 <= THUMBNAIL_DIRECT_BYTES:
            image = self._read_level_region(level, 0, 0, lw, lh)
            if (tw, th) != (lw, lh):
                image = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.BOX))
        else:
            image = self._resize_level(level, tw, th)
        kept = np.array(image)  # tissue detection after a preview reads it from here
        kept.setflags(write=False)
        self._cache.put(key, kept)
        return image, w0 / image.shape[1]

    def _resize_level(self, level: int, tw: int, th: int) -> np.ndarray:
        """``level`` box-resized to ``tw`` x ``th`` chunk by chunk: each chunk of output
        pixels is resampled from the level pixels under it (PIL's BOX with the chunk's exact
        source box, so the result is the whole-level resize), and no chunk is larger than
        about ``THUMBNAIL_CHUNK`` level pixels a side: the level is never held whole."""
        lw, lh = self.level_dimensions[level]
        sx, sy = lw / tw, lh / th
        out = np.empty((th, tw, 3), np.uint8)
        step_x = max(1, int(THUMBNAIL_CHUNK // sx))  # output pixels per chunk
        step_y = max(1, int(THUMBNAIL_CHUNK // sy))
        for r0 in range(0, th, step_y):
            r1 = min(th, r0 + step_y)
            y0, y1 = int(math.floor(r0 * sy)), min(lh, int(math.ceil(r1 * sy)))
            for c0 in range(0, tw, step_x):
                c1 = min(tw, c0 + step_x)
                x0, x1 = int(math.floor(c0 * sx)), min(lw, int(math.ceil(c1 * sx)))
                chunk = self._read_level_region(level, x0, y0, x1 - x0, y1 - y0)
                box = (c0 * sx - x0, r0 * sy - y0, c1 * sx - x0, r1 * sy - y0)
                part = Image.fromarray(chunk).resize((c1 - c0, r1 - r0), Image.Resampling.BOX,
                                                     box=box)  # fmt: skip
                out[r0:r1, c0:c1] = np.asarray(part)
        return out

    def thumbnail(self, max_side: int = 2048) -> np.ndarray:
        return self.thumbnail_with_downsample(max_side)[0]

    # ------------------------------------------------------------------ napari data
    @property
    def levels(self) -> list[LevelArray]:
        """Lazy array-protocol views of every level, largest first (napari multiscale data)."""
        return [LevelArray(self, i) for i in range(self.level_count)]

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.path.name!r}, {w}x{h}, levels={self.level_count}, mpp={self.mpp})"


class LevelArray:
    """One pyramid level as a lazy (height, width, 3) uint8 array.

    Indexing decodes only the native tiles it touches. With ``on_error="warn"`` (used for
    viewing) a tile that fails to decode is drawn blank and a warning names the file and tile,
    so the viewer keeps running; with ``"raise"`` the :class:`TileReadError` propagates.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, slide: Slide, level: int, on_error: str = "warn"):
        self.slide = slide
        self.level = level
        self.on_error = on_error
        w, h = slide.level_dimensions[level]
        self.shape = (h, w, 3)
        self._warned: set[tuple[int, int]] = set()

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] * 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key
        squeeze = [isinstance(k, (int, np.integer)) for k in (ys, xs)]
        ys = _as_slice(ys, self.shape[0])
        xs = _as_slice(xs, self.shape[1])
        y0, y1, ystep = ys.indices(self.shape[0])
        x0, x1, xstep = xs.indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            block = np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
        else:
            block = self._read(x0, y0, x1 - x0, y1 - y0)
        block = block[::ystep, ::xstep]
        block = block[:, :, cs]
        if squeeze[0] and squeeze[1]:
            return block[0, 0]
        if squeeze[0]:
            return block[0]
        if squeeze[1]:
            return block[:, 0]
        return block

    def _read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        try:
            return self.slide._read_level_region(self.level, x, y, w, h)
        except TileReadError as exc:
            if self.on_error == "raise":
                raise
            return self._read_tolerant(x, y, w, h, exc)

    def _read_tolerant(self, x: int, y: int, w: int, h: int, first: TileReadError) -> np.ndarray:
        """Read tile by tile; failed tiles stay blank and are reported once each."""
        slide, level = self.slide, self.level
        tw, th = slide.level_tile_sizes[level]
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                ox, oy = tx * tw, ty * th
                ax0, ay0 = max(x, ox), max(y, oy)
                ax1, ay1 = min(x + w, ox + tw), min(y + h, oy + th)
                try:
                    part = slide._read_level_region(level, ax0, ay0, ax1 - ax0, ay1 - ay0)
                except TileReadError as exc:
                    if (tx, ty) not in self._warned:
                        self._warned.add((tx, ty))
                        warnings.warn(str(exc), SlideReadWarning, stacklevel=2)
                    continue
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = part
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self[:, :, :]
        return arr.astype(dtype) if dtype is not None else arr

    def __repr__(self) -> str:
        return f"LevelArray({self.slide.path.name!r}, level={self.level}, shape={self.shape})"


def _as_slice(k, n: int) -> slice:
    if isinstance(k, slice):
        return k
    if isinstance(k, (int, np.integer)):
        k = int(k) + (n if k < 0 else 0)
        return slice(k, k + 1)
    raise IndexError(f"unsupported index {k!r} for a slide level")
