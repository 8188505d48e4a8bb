"""What every backend provides: level geometry, metadata and native-tile decoding."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..mpp import check_file_mpp


@dataclass(frozen=True)
class LevelInfo:
    width: int
    height: int
    tile_width: int
    tile_height: int
    downsample: float

    @property
    def tiles_x(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_y(self) -> int:
        return -(-self.height // self.tile_height)


class SlideBackend(ABC):
    """A whole-slide file seen as pyramid levels of native tiles.

    ``read_tile`` returns the tile clipped to the level bounds, as uint8 RGB (h, w, 3).
    Implementations must be safe to call from several threads.
    """

    name: str = "base"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.vendor: str = "unknown"
        self.levels: list[LevelInfo] = []
        self.properties: dict[str, str] = {}
        self.mpp: float | None = None
        #: why the file's recorded pixel size was refused (what was read, from where), or None
        self.mpp_note: str | None = None
        self.objective_power: float | None = None
        #: problems of the file found at open that do not stop reading it (e.g. truncated
        #: after its first level: associated images missing); Slide warns with each
        self.open_notes: list[str] = []

    def set_file_mpp(self, *candidates: tuple[object, str]) -> None:
        """Set :attr:`mpp` from the file's recorded values ``(value, where it was read)``, first
        present one wins; an implausible one leaves ``mpp`` None and says why in
        :attr:`mpp_note` (:func:`napari_gpfm.slide.mpp.check_file_mpp`)."""
        self.mpp, self.mpp_note = check_file_mpp(list(candidates), self.path)

    @abstractmethod
    def read_tile(self, level: int, tx: int, ty: int) -> np.ndarray: ...

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray | None:
        """A level-0-addressed region read by the library itself, or ``None`` (the default):
        :class:`~napari_gpfm.slide.Slide` then renders it from native tiles with OpenSlide's
        arithmetic (:mod:`napari_gpfm.slide.resample`). Backends over OpenSlide return
        OpenSlide's own pixels here."""
        return None

    @property
    def associated_names(self) -> list[str]:
        return []

    def associated_image(self, name: str) -> np.ndarray:
        raise KeyError(f"{self.path}: no associated image {name!r}")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def pyramid_downsample(base: tuple[int, int], size: tuple[int, int]) -> float:
    """A level's downsample as OpenSlide computes it: the mean of the height and width ratios
    (``openslide.c``: ``(blh / h + blw / w) / 2``), e.g. 2.000337 for 2220×2967 → 1110×1483.
    Region reads at that level put level-0 ``x`` at ``x / downsample``, so it must be this
    value for the pixels to match OpenSlide's."""
    (bw, bh), (w, h) = base, size
    return ((float(bh) / float(h)) + (float(bw) / float(w))) / 2.0


def to_rgb(array: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D image array as uint8 RGB (h, w, 3)."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        a = a[..., :3]
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.max(initial=0) > 255:
            a = (a / 256).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)
