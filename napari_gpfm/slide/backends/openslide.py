"""Formats that only OpenSlide reads (MIRAX, Ventana BIF, Philips TIFF, ...): optional extra.

Installed with ``pip install 'napari-gpfm[openslide]'`` (openslide-bin + openslide-python).
Level-0-addressed regions (:meth:`OpenSlideBackend.read_region`, hence ``Slide.read_region`` and
``read_patch``) are OpenSlide's own ``read_region``, pixel for pixel. OpenSlide has no
native-tile access, so the tiles napari browses are fixed 512 px windows of a level read with
``read_region`` at the nearest level-0 coordinate (interpolated by OpenSlide where the level's
downsample is fractional; for display only).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..errors import SlideOpenError, TileReadError, UnsupportedSlideError
from .base import LevelInfo, SlideBackend, to_rgb

TILE = 512


def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


class OpenSlideBackend(SlideBackend):
    name = "openslide"

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            import openslide
        except (ImportError, OSError) as exc:
            raise SlideOpenError(
                self.path,
                "this format needs OpenSlide: pip install 'napari-gpfm[openslide]'",
            ) from exc
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedSlideError(
                self.path, "not a format OpenSlide reads (openslide.org lists the formats)"
            ) from exc
        except Exception as exc:
            raise SlideOpenError(self.path, f"OpenSlide cannot read it ({exc})") from exc
        props = dict(self._osr.properties)
        self.properties = {k: str(v) for k, v in props.items()}
        self.vendor = props.get("openslide.vendor", "unknown")
        self.set_file_mpp(
            (props.get("openslide.mpp-x"), "property openslide.mpp-x"),
            (props.get("openslide.mpp-y"), "property openslide.mpp-y"),
        )
        obj = props.get("openslide.objective-power")
        self.objective_power = float(obj) if obj else None
        for (w, h), ds in zip(self._osr.level_dimensions, self._osr.level_downsamples):
            self.levels.append(LevelInfo(int(w), int(h), TILE, TILE, float(ds)))
        # OpenSlide handles are thread-safe, but keep reads ordered per handle for old builds.
        self._lock = threading.Lock()

    def read_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        info = self.levels[level]
        x, y = tx * TILE, ty * TILE
        w, h = min(TILE, info.width - x), min(TILE, info.height - y)
        ds = info.downsample
        try:
            with self._lock:
                region = self._osr.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except Exception as exc:
            raise TileReadError(self.path, level, tx, ty, str(exc)) from exc
        return _rgb(region)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """OpenSlide's ``read_region`` itself (its interpolation at fractional downsamples)."""
        try:
            with self._lock:
                region = self._osr.read_region((int(x), int(y)), level, (int(width), int(height)))
        except Exception as exc:
            ds = self.levels[level].downsample
            raise TileReadError(
                self.path, level, int(x / ds) // TILE, int(y / ds) // TILE,
                f"OpenSlide cannot read the {width}×{height} region at level-0 ({x}, {y}): {exc}",
            ) from exc  # fmt: skip
        return _rgb(region)

    @property
    def associated_names(self) -> list[str]:
        return list(self._osr.associated_images.keys())

    def associated_image(self, name: str) -> np.ndarray:
        return to_rgb(np.asarray(self._osr.associated_images[name].convert("RGB")))

    def close(self) -> None:
        self._osr.close()


def _rgb(region) -> np.ndarray:
    """OpenSlide's RGBA (un-premultiplied by openslide-python) as RGB; transparent (outside
    the scanned area) is white, the slide background."""
    rgba = np.asarray(region)
    rgb = to_rgb(rgba).copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb
