"""TIFF-family slides (Aperio SVS, generic pyramidal TIFF, OME-TIFF, NDPI, SCN) via tiffslide.

tiffslide parses the vendor metadata and finds the pyramid levels. Tiles are then decoded
directly: the compressed bytes are read with ``os.pread`` (thread- and fork-safe) and handed to
tifffile's segment decoder, so one native tile costs one decode and nothing else. Levels whose
pages are not plainly tiled (e.g. NDPI strips) go through tiffslide's own ``read_region``.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from ..errors import (
    DamagedSlideError,
    EmptySlideError,
    SlideOpenError,
    TileReadError,
    TruncatedSlideWarning,
    UnsupportedSlideError,
)
from .base import LevelInfo, SlideBackend, pyramid_downsample, to_rgb

OME_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
# Virtual tile side for levels read through tiffslide's read_region.
FALLBACK_TILE = 512


class TiffBackend(SlideBackend):
    name = "tiffslide"

    def __init__(self, path: Path):
        super().__init__(path)
        import tiffslide

        self._fd = None
        try:
            self._ts = tiffslide.TiffSlide(str(self.path))
            self._read_structure()
        except SlideOpenError:
            self.close()
            raise
        except Exception as exc:  # tiffslide/tifffile raise many kinds
            self.close()
            raise _classify_failure(self.path, exc) from exc

    def _read_structure(self) -> None:
        props = self._ts.properties
        self.vendor = str(props.get("tiffslide.vendor") or "generic-tiff")
        self.properties = {k: "" if v is None else str(v) for k, v in props.items()}
        self.set_file_mpp(
            (props.get("tiffslide.mpp-x"), f"property tiffslide.mpp-x{_mpp_origin(props)}"),
            (props.get("tiffslide.mpp-y"), f"property tiffslide.mpp-y{_mpp_origin(props)}"),
        )
        obj = props.get("tiffslide.objective-power")
        self.objective_power = float(obj) if obj not in (None, "") else None
        if self._ts.ts_tifffile.is_ome:
            self._read_ome(self._ts.ts_tifffile.ome_metadata)

        series = self._ts.ts_tifffile.series[int(props.get("tiffslide.series-index") or 0)]
        layout = _describe_layout(series, self._ts.ts_tifffile.is_ome)
        if layout is not None:
            raise UnsupportedSlideError(self.path, _unsupported_message(layout))
        self._fd = os.open(self.path, os.O_RDONLY)
        self._pages = []
        file_size = os.path.getsize(self.path)
        base = self._ts.level_dimensions[0]
        for lvl, dims in enumerate(self._ts.level_dimensions):
            page = series.levels[lvl].keyframe
            _check_compression(self.path, page, lvl)
            _check_claim(self.path, page, lvl, file_size)
            direct = bool(
                getattr(page, "is_tiled", False)
                and not getattr(page, "is_ndpi", False)
                and page.planarconfig == 1
                and len(page.dataoffsets) > 0
            )
            if direct:
                ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
                if ends.max() > file_size:
                    raise DamagedSlideError(
                        self.path,
                        f"the file is truncated: level {lvl} needs {int(ends.max()):,} bytes but the "
                        f"file has {file_size:,}. Copy or download it again.",
                    )
                tw, th = int(page.tilewidth), int(page.tilelength)
            else:
                tw = th = FALLBACK_TILE
            self._pages.append(page if direct else None)
            ds = 1.0 if lvl == 0 else pyramid_downsample(base, dims)
            self.levels.append(LevelInfo(int(dims[0]), int(dims[1]), tw, th, ds))
        if not self.levels:
            raise EmptySlideError(self.path, "the TIFF holds no image levels")
        self._check_page_chain(file_size)

    def _check_page_chain(self, file_size: int) -> None:
        """Warn when the TIFF's list of pages breaks off: a page points to a next page beyond
        the end of the file (the file is cut short after the pages read). What the missing
        pages held is said where it can be known (an Aperio SVS holds a thumbnail, a label
        and a macro image)."""
        tif = self._ts.ts_tifffile
        try:
            n_pages = len(tif.pages)
            # The last page's offset by following the same next-page pointers tifffile
            # followed (two small reads a page), not by parsing the page again: tifffile does
            # not keep its pages, and parsing one costs more than the rest of this check.
            offset = int(tif.pages.first.offset) if n_pages <= 64 else None
            for _ in range(n_pages - 1 if offset is not None else 0):
                offset = _next_ifd_offset(self._fd, tif, offset)
                if not 0 < offset < file_size:
                    offset = None
                    break
            if offset is None:  # many pages, or a chain that is not what tifffile read
                offset = int(tif.pages[n_pages - 1].offset)
            nxt = _next_ifd_offset(self._fd, tif, offset)
        except Exception:  # the check must never stop a readable slide from opening
            return
        if nxt == 0 or nxt < file_size:
            return
        missing = ""
        if self.vendor == "aperio":
            gone = [n for n in ("thumbnail", "label", "macro") if n not in self.associated_names]
            if gone:
                names = ", ".join(gone[:-1]) + " and " + gone[-1] if len(gone) > 1 else gone[0]
                missing = f" (the {names} image{'s' if len(gone) > 1 else ''} of the SVS)"
        warnings.warn(
            f"{self.path}: the file is truncated ({file_size:,} bytes): its page {n_pages - 1} "
            f"points to a next page at byte {nxt:,}, beyond the end, so every page after it is "
            f"missing{missing}. The {len(self.levels)} pyramid level(s) present are read; "
            "copy or download the file again to get the rest.",
            TruncatedSlideWarning,
            stacklevel=6,
        )

    def _read_ome(self, xml: str) -> None:
        """OME-TIFF: pixel size and objective from the OME-XML (tiffslide does not parse them)."""
        import xml.etree.ElementTree as ET

        root = ET.fromstring(xml)
        ns = {"ome": root.tag[1:].split("}")[0]} if root.tag.startswith("{") else {}
        pixels = root.find(".//ome:Pixels", ns) if ns else root.find(".//Pixels")
        self.vendor = "ome"
        if pixels is not None and self.mpp is None:
            size = pixels.get("PhysicalSizeX") or pixels.get("PhysicalSizeY")
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            if size is not None and unit in OME_UNIT_TO_UM:
                try:
                    value: object = float(size) * OME_UNIT_TO_UM[unit]
                except ValueError:
                    value = size
                self.set_file_mpp((value, f"OME-XML PhysicalSizeX {size} {unit}"))
        objective = root.find(".//ome:Objective", ns) if ns else root.find(".//Objective")
        if objective is not None and objective.get("NominalMagnification"):
            self.objective_power = float(objective.get("NominalMagnification"))
        self.properties["ome.xml"] = xml[:20_000]

    def read_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        info = self.levels[level]
        x, y = tx * info.tile_width, ty * info.tile_height
        w = min(info.tile_width, info.width - x)
        h = min(info.tile_height, info.height - y)
        page = self._pages[level]
        try:
            if page is None:
                loc = (self._level0_coordinate(level, x), self._level0_coordinate(level, y))
                region = self._ts.read_region(loc, level, (w, h), as_array=True)
                return to_rgb(region)
            index = ty * info.tiles_x + tx
            count = int(page.databytecounts[index])
            if count == 0:  # sparse tile: nothing was scanned there
                return np.full((h, w, 3), 255, np.uint8)
            data = os.pread(self._fd, count, int(page.dataoffsets[index]))
            if len(data) != count:
                raise OSError(f"read {len(data)} of {count} bytes")
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            if segment is None:
                raise ValueError("decoder returned nothing")
            return to_rgb(segment[0, :h, :w])
        except TileReadError:
            raise
        except Exception as exc:
            raise TileReadError(self.path, level, tx, ty, f"{type(exc).__name__}: {exc}") from exc

    def _level0_coordinate(self, level: int, v: int) -> int:
        """The level-0 coordinate that tiffslide maps back to pixel ``v`` of ``level`` (it
        takes ``int(v0 / ds)`` with its own downsample), so fallback tiles hold the level's
        own pixels and are not shifted by one."""
        ds = float(self._ts.level_downsamples[level])
        v0 = max(0, math.ceil(v * ds))
        while int(v0 / ds) < v:
            v0 += 1
        while v0 > 0 and int((v0 - 1) / ds) >= v:
            v0 -= 1
        return v0

    @property
    def associated_names(self) -> list[str]:
        return list(self._ts.associated_images.keys())

    def associated_image(self, name: str) -> np.ndarray:
        try:
            image = self._ts.associated_images[name]
        except KeyError:
            raise KeyError(f"{self.path}: no associated image {name!r}") from None
        return to_rgb(np.asarray(image.convert("RGB")))

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_ts", None) is not None:
            self._ts.close()


def _mpp_origin(props) -> str:
    """Where tiffslide read its mpp: the TIFF resolution tags (named with their values) when it
    recovered it from them, else the vendor metadata."""
    unit = props.get("tiff.ResolutionUnit")
    if unit is not None and props.get("tiff.XResolution") is not None:
        x = props.get("tiff.XResolution")
        x = f"{x:g}" if isinstance(x, (int, float)) else str(x)
        return f", from the TIFF resolution tags: {x} px per {str(unit).lower()}"
    vendor = props.get("tiffslide.vendor")
    return f", from the {vendor} metadata" if vendor else ""


def _next_ifd_offset(fd: int, tif, ifd_offset: int) -> int:
    """The next-page pointer stored at the end of the page (IFD) at ``ifd_offset``."""
    big = bool(tif.is_bigtiff)
    bo = tif.byteorder
    count_fmt, entry, ptr_fmt = (f"{bo}Q", 20, f"{bo}Q") if big else (f"{bo}H", 12, f"{bo}I")
    raw = os.pread(fd, struct.calcsize(count_fmt), ifd_offset)
    (count,) = struct.unpack(count_fmt, raw)
    where = ifd_offset + struct.calcsize(count_fmt) + count * entry
    raw = os.pread(fd, struct.calcsize(ptr_fmt), where)
    if len(raw) < struct.calcsize(ptr_fmt):
        return where + 1  # the pointer itself is cut off: beyond the end
    return struct.unpack(ptr_fmt, raw)[0]


def _check_claim(path: Path, page, level: int, file_size: int) -> None:
    """Refuse at open a level whose header claims what the file cannot hold: a tile (or
    strip) table listing fewer chunks than the claimed width x height needs (e.g. a damaged
    header claiming 10⁹ x 10⁹ px over a table of 16 tiles)."""
    if getattr(page, "is_ndpi", False):  # NDPI: one JPEG stream per level, no chunk table
        return
    w, h = int(page.imagewidth), int(page.imagelength)
    planes = int(page.samplesperpixel) if page.planarconfig == 2 else 1
    if getattr(page, "is_tiled", False):
        tw, th = int(page.tilewidth), int(page.tilelength)
        if tw <= 0 or th <= 0:
            return
        needed = -(-w // tw) * -(-h // th) * planes
        unit = f"tiles of {tw}×{th} px"
    else:
        rows = int(getattr(page, "rowsperstrip", 0) or 0)
        if rows <= 0:
            return
        needed = -(-h // min(rows, max(h, 1))) * planes
        unit = f"strips of {rows} rows"
    listed = len(page.dataoffsets)
    if listed >= needed:
        return
    raise DamagedSlideError(
        path,
        f"the header of level {level} claims {w:,} × {h:,} px, which needs {needed:,} {unit}, "
        f"but its table lists {listed:,} (the file has {file_size:,} bytes): the header is "
        "damaged. Copy or download the file again.",
    )


TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
# What a slide level must look like: 2-D, RGB(A) samples or one grey channel, 8 or 16 bit.
SUPPORTED_LAYOUT = (
    "8- or 16-bit brightfield images: RGB (or RGBA) pixels, or one grey channel, in a 2-D "
    "pyramid (Aperio SVS, generic tiled TIFF, OME-TIFF, Hamamatsu NDPI, Leica SCN, QPTIFF RGB)"
)


def _unsupported_message(layout: str) -> str:
    return f"{layout}: not a brightfield slide napari-gpfm reads. Supported: {SUPPORTED_LAYOUT}."


def _check_compression(path: Path, page, level: int) -> None:
    """Refuse at open a level whose compression no installed decoder handles (OpenSlide
    refuses such files at open too), naming the compression."""
    import tifffile

    compression = page.compression
    if compression in tifffile.TIFF.DECOMPRESSORS:
        return
    try:
        name = f"{tifffile.COMPRESSION(compression).name} ({int(compression)})"
    except ValueError:
        name = f"{int(compression)} (not a compression code any TIFF library defines)"
    known = sorted(
        c.name
        for c in tifffile.COMPRESSION
        if c in tifffile.TIFF.DECOMPRESSORS and c.value > 1
        and "DEPRECATED" not in c.name and not c.name.startswith("EER")
    )
    raise UnsupportedSlideError(
        path,
        f"unsupported TIFF compression {name} in level {level}. The file is not damaged: no "
        f"installed decoder reads it. Supported compressions: none, {', '.join(known)}.",
    )


def _classify_failure(path: Path, exc: Exception) -> SlideOpenError:
    """What is true about a TIFF that cannot be opened: another kind of image (unsupported),
    a broken or truncated TIFF (damaged), or no TIFF at all (damaged, or not a slide)."""
    if isinstance(exc, SlideOpenError):
        return exc
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(4)
    if header not in TIFF_MAGIC:
        return DamagedSlideError(
            path,
            f"not a readable TIFF-based slide: the file does not start with a TIFF header "
            f"({size:,} bytes; {exc}). It is damaged, or another kind of file with a slide's "
            "name; copy or download it again.",
        )
    layout = _unsupported_layout(path)
    if layout is not None:
        return UnsupportedSlideError(path, _unsupported_message(layout))
    return DamagedSlideError(
        path,
        f"the TIFF structure is damaged or the file is truncated "
        f"({size:,} bytes; {type(exc).__name__}: {exc}). Copy or download it again.",
    )


def _unsupported_layout(path: Path) -> str | None:
    """:func:`_describe_layout` of the file's first series, or ``None`` when tifffile cannot
    read the structure either (then the file is damaged)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return _describe_layout(tif.series[0], tif.is_ome)
    except Exception:
        return None


def _describe_layout(series, is_ome: bool) -> str | None:
    """``None`` for a 2-D RGB(A) or grey 8/16-bit image; else what it is, e.g. ``an OME-TIFF
    of 3 channels × 5 z-planes of 439×167 int8 pixels (axes CZYX)``."""
    axes, shape, dtype = series.axes, tuple(series.shape), np.dtype(series.dtype)
    names = {"C": "channels", "Z": "z-planes", "T": "time points", "S": "samples",
             "Q": "planes", "I": "images", "R": "tiles"}  # fmt: skip
    extra = [(a, n) for a, n in zip(axes, shape) if a not in "YX"]
    rgb = len(extra) == 1 and extra[0][0] in "SC" and extra[0][1] in (3, 4)
    grey = all(n == 1 for _, n in extra)
    if (rgb or grey) and dtype in (np.uint8, np.uint16) and "Y" in axes and "X" in axes:
        return None
    dims = " × ".join(f"{n} {names.get(a, a)}" for a, n in extra if n > 1)
    h = shape[axes.index("Y")] if "Y" in axes else "?"
    w = shape[axes.index("X")] if "X" in axes else "?"
    kind = "an OME-TIFF" if is_ome else "a TIFF"
    return f"{kind} of {dims + ' of ' if dims else ''}{w}×{h} {dtype} pixels (axes {axes})"
