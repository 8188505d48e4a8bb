"""Test helpers for the tiles tests (a uniquely named module, importable from test files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"


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


# ----------------------------------------------------------------- real H&E test images
# shared/ sits beside the repository (see ../shared/data/SOURCES.md)
SHARED = REPO.parent / "shared" / "data"
CRC_TILES = SHARED / "tiles" / "crc-he" / "CRC-VAL-HE-7K"
SAMPLE_PYRAMID = SHARED / "wsi" / "CMU-1-Small-Region.pyramid.tif"
SAMPLE_MPP = 0.499

# Hand-traced tissue of the sample slide (level-0 px, x y), drawn by eye on a half-resolution
# view: the main strip of skin, the thin strand on the left, minus two large empty clefts.
# Loose shreds off the right edge and specks on the glass are left out (ambiguous, < 1 %).
SAMPLE_HAND_TISSUE = [
    [(790, 220), (860, 150), (960, 140), (1010, 90), (1090, 80), (1150, 120), (1240, 170),
     (1320, 200), (1340, 300), (1400, 340), (1490, 410), (1540, 480), (1580, 540), (1600, 600),
     (1616, 700), (1610, 840), (1620, 900), (1620, 1040), (1600, 1200), (1660, 1320),
     (1760, 1320), (1810, 1380), (1800, 1440), (1740, 1490), (1640, 1600), (1580, 1660),
     (1540, 1760), (1600, 1740), (1700, 1810), (1800, 1830), (1870, 1860), (1850, 2000),
     (1870, 2200), (1840, 2400), (1790, 2500), (1760, 2600), (1730, 2800), (1700, 2967),
     (510, 2967), (520, 2760), (550, 2600), (600, 2500), (660, 2300), (700, 2200), (750, 2000),
     (800, 1800), (810, 1600), (840, 1400), (860, 1200), (890, 1080), (900, 960), (924, 800),
     (940, 680), (960, 600), (940, 540), (840, 520), (820, 490), (880, 470), (960, 450),
     (940, 360), (890, 300), (800, 250)],
    [(60, 1140), (180, 1080), (320, 1040), (480, 1016), (600, 1024), (680, 1044), (800, 1070),
     (880, 1060), (890, 1100), (800, 1100), (660, 1090), (500, 1080), (340, 1096), (200, 1130),
     (80, 1156)],
]
SAMPLE_HAND_GAPS = [
    [(1096, 230), (1180, 220), (1260, 250), (1300, 320), (1360, 420), (1410, 480), (1430, 560),
     (1400, 610), (1340, 600), (1280, 600), (1200, 610), (1140, 580), (1100, 480), (1090, 340)],
    [(1320, 1180), (1400, 1120), (1500, 1140), (1580, 1200), (1580, 1280), (1520, 1320),
     (1460, 1400), (1400, 1520), (1440, 1600), (1540, 1640), (1520, 1720), (1400, 1760),
     (1340, 1720), (1310, 1600), (1300, 1440), (1300, 1280)],
]


def polygon_mask(shape: tuple[int, int], polygons, gaps=()) -> np.ndarray:
    """(h, w) bool mask: inside any of ``polygons`` and outside every one of ``gaps``."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        draw.polygon([tuple(p) for p in poly], fill=1)
    for poly in gaps:
        draw.polygon([tuple(p) for p in poly], fill=0)
    return np.asarray(img).astype(bool)


def sample_hand_mask() -> np.ndarray:
    """The hand-made tissue mask of the whole sample slide, at level 0 (2967 x 2220)."""
    return polygon_mask((2967, 2220), SAMPLE_HAND_TISSUE, SAMPLE_HAND_GAPS)


_SAMPLE_RGB: list[np.ndarray] = []


def sample_rgb() -> np.ndarray:
    """Level 0 of the bundled sample slide (real H&E, 0.499 µm/px), read once."""
    if not _SAMPLE_RGB:
        from napari_gpfm.slide import open_slide

        slide = open_slide(SAMPLE)
        w, h = slide.level_dimensions[0]
        _SAMPLE_RGB.append(slide.read_region(0, 0, 0, w, h))
        slide.close()
    return _SAMPLE_RGB[0]


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float, levels: int = 2) -> Path:
    """A small tiled-JPEG pyramidal TIFF (2x box-filtered reduced levels, resolution tags)."""
    import tifffile

    pyramid = [np.ascontiguousarray(rgb)]
    for _ in range(levels - 1):
        prev = pyramid[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        pyramid.append(
            prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).astype(np.uint8)
        )
    opts = dict(tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(pyramid):
            res = 1e4 / (mpp * 2**i)
            tif.write(level, subfiletype=1 if i else 0, resolution=(res, res),
                      resolutionunit="CENTIMETER", **opts)  # fmt: skip
    return path


def all_tissue_crop() -> np.ndarray:
    """The tissue-rich middle of the sample slide (900 x 650 px at level 0): all tissue, with
    the white gaps between collagen fibres that real tissue has."""
    return sample_rgb()[2000:2900, 750:1400].copy()


def issue_crop() -> np.ndarray:
    """Issue 14's case: a 1101 x 1101 all-tissue crop at 0.227 µm/px (a 500 x 500 px region
    of the sample, 0.499 µm/px, resampled to 0.227 µm/px)."""
    from PIL import Image

    region = sample_rgb()[2100:2600, 800:1300]
    return np.asarray(Image.fromarray(region).resize((1101, 1101), Image.Resampling.BICUBIC))


# Centres (level-0 x, y) in the sample of the discs cut as TMA cores: all inside dense tissue.
TMA_SOURCES = [(1000, 2200), (1400, 2100), (900, 2650), (1300, 2600), (1150, 2400)]
TMA_CENTRES = [(300, 300), (800, 300), (1300, 300), (550, 800), (1050, 800)]
TMA_RADIUS = 150


def tma_image(cast: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A TMA-like image (1100 x 1600 at 0.499 µm/px): five round cores of real tissue cut from
    the sample, pasted on real glass from the sample (mirror-tiled). Returns ``(rgb, hand
    mask)``, the mask being the cores' discs. ``cast`` multiplies the channels (a scanner's
    colour cast, applied to glass and tissue alike)."""
    rgb = sample_rgb()
    glass = rgb[200:950, 100:700]  # empty glass left of the tissue
    tile = np.concatenate([glass, glass[::-1]], 0)
    tile = np.concatenate([tile, tile[:, ::-1]], 1)
    h, w = 1100, 1600
    canvas = np.tile(tile, (2, 2, 1))[:h, :w].copy()
    r = TMA_RADIUS
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = xx**2 + yy**2 <= r * r
    hand = np.zeros((h, w), bool)
    for (sx, sy), (dx, dy) in zip(TMA_SOURCES, TMA_CENTRES):
        core = rgb[sy - r : sy + r + 1, sx - r : sx + r + 1]
        canvas[dy - r : dy + r + 1, dx - r : dx + r + 1][disc] = core[disc]
        hand[dy - r : dy + r + 1, dx - r : dx + r + 1] |= disc
    if cast is not None:
        canvas = np.clip(canvas * np.asarray(cast, np.float32), 0, 255).astype(np.uint8)
    return canvas, hand


def mask_at_level0(tm, shape: tuple[int, int]) -> np.ndarray:
    """A :class:`TissueMask`'s mask resampled (nearest) to level-0 ``shape`` (h, w)."""
    ys = np.minimum((np.arange(shape[0]) / tm.downsample).astype(int), tm.mask.shape[0] - 1)
    xs = np.minimum((np.arange(shape[1]) / tm.downsample).astype(int), tm.mask.shape[1] - 1)
    return tm.mask[np.ix_(ys, xs)]
