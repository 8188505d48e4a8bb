"""TIFF-family slides (Aperio SVS, generic pyramidal TIFF, OME-TIFF, NDPI, SCN) via tiffslide.

tiffslide parses the vendor metadata and finds the pyramid levels. Tiles are then decoded
directly: the compressed bytes are read with ``os.pread`` (thread- and fork-safe) and handed to
tifffile's segment decoder, so one native tile costs one decode and nothing else. Levels whose
pages are not plainly tiled (e.g. NDPI strips) go through tiffslide's own ``read_region``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import SlideOpenError, TileReadError
from .base import LevelInfo, SlideBackend, plausible_mpp, to_rgb

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
            raise SlideOpenError(self.path, _describe_failure(self.path, exc)) from exc

    def _read_structure(self) -> None:
        props = self._ts.properties
        self.vendor = str(props.get("tiffslide.vendor") or "generic-tiff")
        self.properties = {k: "" if v is None else str(v) for k, v in props.items()}
        mpp_x = plausible_mpp(props.get("tiffslide.mpp-x"))
        mpp_y = plausible_mpp(props.get("tiffslide.mpp-y"))
        self.mpp = mpp_x if mpp_x is not None else mpp_y
        obj = props.get("tiffslide.objective-power")
        self.objective_power = float(obj) if obj not in (None, "") else None
        if self._ts.ts_tifffile.is_ome:
            self._read_ome(self._ts.ts_tifffile.ome_metadata)

        series = self._ts.ts_tifffile.series[int(props.get("tiffslide.series-index") or 0)]
        self._fd = os.open(self.path, os.O_RDONLY)
        self._pages = []
        file_size = os.path.getsize(self.path)
        for lvl, (dims, ds) in enumerate(zip(self._ts.level_dimensions, self._ts.level_downsamples)):
            page = series.levels[lvl].keyframe
            direct = bool(
                getattr(page, "is_tiled", False)
                and not getattr(page, "is_ndpi", False)
                and page.planarconfig == 1
                and len(page.dataoffsets) > 0
            )
            if direct:
                ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
                if ends.max() > file_size:
                    raise SlideOpenError(
                        self.path,
                        f"the file is truncated: level {lvl} needs {int(ends.max()):,} bytes but the "
                        f"file has {file_size:,}. Copy or download it again.",
                    )
                tw, th = int(page.tilewidth), int(page.tilelength)
            else:
                tw = th = FALLBACK_TILE
            self._pages.append(page if direct else None)
            self.levels.append(LevelInfo(int(dims[0]), int(dims[1]), tw, th, float(ds)))
        if not self.levels:
            raise SlideOpenError(self.path, "the TIFF holds no image levels")

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
                self.mpp = plausible_mpp(float(size) * OME_UNIT_TO_UM[unit])
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
                ds = info.downsample
                region = self._ts.read_region(
                    (round(x * ds), round(y * ds)), level, (w, h), as_array=True
                )
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


def _describe_failure(path: Path, exc: Exception) -> str:
    """Tell a damaged/truncated TIFF (valid header) from a file that is no TIFF at all."""
    with open(path, "rb") as f:
        header = f.read(4)
    if header in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return (
            f"the TIFF structure is damaged or the file is truncated "
            f"({os.path.getsize(path):,} bytes; {type(exc).__name__}: {exc}). Copy or download it again."
        )
    return f"not a readable TIFF-based slide: the file does not start with a TIFF header ({exc})"
