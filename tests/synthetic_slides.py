"""Slide files for tests and benchmarks: small tiled TIFFs of given pixels (`write_tiff`) and
large synthetic pyramids made by tiling a real slide (`make_large_pyramid`).

Not part of the package (the wheel does not ship it): tests import it as ``synthetic_slides``
(``tests/`` is on ``sys.path`` under pytest), bench scripts put ``tests/`` on ``sys.path`` first.

``make_large_pyramid`` writes a BigTIFF generic pyramid of any size in about a second: every
level's tiles are JPEG-encoded once from a real slide region (the bundled sample by default)
and the tile tables point many grid positions at the same compressed bytes. tiffslide, tifffile
and OpenSlide read it as an ordinary tiled JPEG pyramid ("generic-tiff").
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

TILE = 256
JPEG_QUALITY = 80
# TIFF tag types
SHORT, LONG, RATIONAL, ASCII, LONG8 = 3, 4, 5, 2, 16
_TYPE_SIZE = {SHORT: 2, LONG: 4, RATIONAL: 8, ASCII: 1, LONG8: 8}
_TYPE_FMT = {SHORT: "H", LONG: "I", LONG8: "Q"}


def write_tiff(path: Path, rgb: np.ndarray, mpp: float | None = 0.5) -> Path:
    """Tiled RGB TIFF, with resolution tags (µm/px) when ``mpp`` is given."""
    import tifffile

    kw = {}
    if mpp is not None:
        kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="zlib", **kw)
    return path


def _tile_bank(source: np.ndarray, levels: int) -> list[list[bytes]]:
    """JPEG tiles cut from ``source`` (RGB), downsampled by 2**level for each level."""
    import imagecodecs
    from PIL import Image

    banks = []
    image = Image.fromarray(source)
    for level in range(levels):
        scaled = np.asarray(
            image.resize(
                (max(TILE, source.shape[1] >> level), max(TILE, source.shape[0] >> level)),
                Image.Resampling.BOX,
            )
        )
        ny, nx = scaled.shape[0] // TILE, scaled.shape[1] // TILE
        bank = [
            imagecodecs.jpeg8_encode(
                np.ascontiguousarray(scaled[j * TILE : (j + 1) * TILE, i * TILE : (i + 1) * TILE]),
                level=JPEG_QUALITY,
                subsampling=(2, 2),
            )
            for j in range(ny)
            for i in range(nx)
        ]
        banks.append(bank)
    return banks


def _entry(tag: int, typ: int, values, extra: bytearray, base: int) -> tuple[bytes, bool]:
    """One BigTIFF IFD entry (20 bytes); values that don't fit in 8 bytes go to ``extra``."""
    if typ == ASCII:
        data = values.encode("ascii") + b"\0"
        count = len(data)
    elif typ == RATIONAL:
        data = b"".join(struct.pack("<II", n, d) for n, d in values)
        count = len(values)
    else:
        values = np.asarray(values).ravel()
        data = values.astype({SHORT: "<u2", LONG: "<u4", LONG8: "<u8"}[typ]).tobytes()
        count = values.size
    if len(data) <= 8:
        return struct.pack("<HHQ", tag, typ, count) + data.ljust(8, b"\0"), False
    offset = base + len(extra)
    extra += data
    if len(extra) % 2:
        extra += b"\0"
    return struct.pack("<HHQQ", tag, typ, count, offset), True


def make_large_pyramid(
    path: str | Path,
    width: int = 100_000,
    height: int = 100_000,
    mpp: float | None = 0.499,
    source: str | Path | None = None,
    min_side: int = 1024,
) -> Path:
    """Write a ``width`` x ``height`` generic tiled-JPEG pyramid (2x levels down to ``min_side``)
    built from real tissue. ``mpp=None`` writes no resolution tags (a slide without mpp)."""
    from napari_gpfm._resources import sample_slide_path
    from napari_gpfm.slide import open_slide

    path = Path(path)
    if source is None:
        source = sample_slide_path()
    src = open_slide(source)
    w0, h0 = src.dimensions
    region = src.read_region(0, 0, 0, (w0 // TILE) * TILE, (h0 // TILE) * TILE)
    src.close()

    dims = [(width, height)]
    while max(dims[-1]) // 2 >= min_side:
        dims.append((math.ceil(dims[-1][0] / 2), math.ceil(dims[-1][1] / 2)))
    banks = _tile_bank(region, len(dims))

    with open(path, "wb") as f:
        f.write(struct.pack("<2sHHHQ", b"II", 43, 8, 0, 0))  # first-IFD offset patched below
        bank_offsets = []
        for bank in banks:  # each unique tile's bytes, once
            offs = []
            for data in bank:
                offs.append(f.tell())
                f.write(data)
            bank_offsets.append((np.asarray(offs, np.uint64), np.asarray([len(d) for d in bank], np.uint64)))
        prev_next_ptr = 8
        for level, (w, h) in enumerate(dims):
            nx, ny = math.ceil(w / TILE), math.ceil(h / TILE)
            offs, counts = bank_offsets[level]
            src_nx = max(1, (region.shape[1] >> level) // TILE)
            src_ny = max(1, (region.shape[0] >> level) // TILE)
            jj, ii = np.meshgrid(np.arange(ny) % src_ny, np.arange(nx) % src_nx, indexing="ij")
            pick = (jj * src_nx + ii).ravel()
            entries = [
                (254, LONG, [0 if level == 0 else 1]),
                (256, LONG, [w]),
                (257, LONG, [h]),
                (258, SHORT, [8, 8, 8]),
                (259, SHORT, [7]),
                (262, SHORT, [6]),
            ]
            if level == 0:
                entries.append(
                    (270, ASCII, f"napari-gpfm synthetic pyramid {width}x{height} tiled from {Path(source).name}")
                )
            entries += [(277, SHORT, [3])]
            if mpp is not None:
                ppcm = round(1e4 / (mpp * 2**level) * 100_000)
                entries += [(282, RATIONAL, [(ppcm, 100_000)]), (283, RATIONAL, [(ppcm, 100_000)])]
            entries += [(284, SHORT, [1])]
            if mpp is not None:
                entries += [(296, SHORT, [3])]
            entries += [
                (322, LONG, [TILE]),
                (323, LONG, [TILE]),
                (324, LONG8, offs[pick]),
                (325, LONG8, counts[pick]),
                (530, SHORT, [2, 2]),
            ]
            ifd_offset = f.tell()
            ifd_size = 8 + 20 * len(entries) + 8
            extra = bytearray()
            raw = b"".join(_entry(t, ty, v, extra, ifd_offset + ifd_size)[0] for t, ty, v in entries)
            f.write(struct.pack("<Q", len(entries)) + raw + struct.pack("<Q", 0) + bytes(extra))
            end = f.tell()
            f.seek(prev_next_ptr)
            f.write(struct.pack("<Q", ifd_offset))
            f.seek(end)
            prev_next_ptr = ifd_offset + 8 + 20 * len(entries)
    return path
