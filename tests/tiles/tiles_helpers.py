"""Test helpers for the tiles tests (a uniquely named module, importable from test files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"


def write_tiff(path: Path, rgb: np.ndarray, mpp: float | None = 0.5) -> Path:
    """Tiled RGB TIFF, with resolution tags (µm/px) when ``mpp`` is given."""
    import tifffile

    kw = {}
    if mpp is not None:
        kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="zlib", **kw)
    return path


class FakeSlide:
    """In-memory slide with the parts of the Slide contract that tiles use."""

    def __init__(self, image: np.ndarray, mpp: float | None, mpp_source: str | None = "file",
                 downsamples: tuple[float, ...] = (1.0,), path: str = "fake.svs",
                 dims: tuple[int, int] | None = None):
        self.image = image
        self.mpp = mpp
        self.mpp_source = mpp_source if mpp is not None else None
        self.path = Path(path)
        self.name = self.path.stem
        w, h = dims or (image.shape[1], image.shape[0])
        self.level_downsamples = list(downsamples)
        self.level_dimensions = [(round(w / d), round(h / d)) for d in downsamples]

    def with_mpp(self, mpp: float) -> FakeSlide:
        s = FakeSlide(self.image, mpp, "user", tuple(self.level_downsamples), str(self.path),
                      self.level_dimensions[0])
        return s

    def thumbnail_with_downsample(self, max_side: int) -> tuple[np.ndarray, float]:
        step = max(1, int(np.ceil(max(self.image.shape[:2]) / max_side)))
        thumb = self.image[::step, ::step]
        return thumb, self.level_dimensions[0][0] / thumb.shape[1]

    def read_patch(self, x: int, y: int, size0: int, out_size: int) -> np.ndarray:
        from PIL import Image

        region = self.image[y : y + size0, x : x + size0]
        return np.asarray(Image.fromarray(region).resize((out_size, out_size)))
