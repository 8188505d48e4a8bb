"""Export per-patch tables (CSV, Parquet), heatmap rasters (RGBA PNG overlays, one pixel per
patch) and full-resolution maps (tiled pyramid TIFFs at the slide's level-0 size or a chosen
downsample).

Every file is written atomically: to a temporary name in the destination folder, then renamed
(:func:`atomic_path`), so an interrupted export never leaves a half-written file under the
final name.

Colormap choice: a built-in viridis lookup table, so exports look the same with or without
matplotlib (not a dependency of this package). It is linear interpolation between ten evenly
spaced samples of viridis (the CC0 colormap by van der Walt & Smith), within a couple of
8-bit levels of the reference. ``"gray"`` and any (n, 3)/(n, 4) array LUT are accepted too.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .heatmap import Raster

__all__ = [
    "ExportCancelled",
    "atomic_path",
    "map_tile_count",
    "map_downsamples",
    "sample_raster",
    "write_map_tiff",
    "write_table",
    "write_csv",
    "write_parquet",
    "colormap_lut",
    "apply_colormap",
    "write_heatmap_png",
]

_VIRIDIS_10 = (
    "440154", "482878", "3e4989", "31688e", "26828e",
    "1f9e89", "35b779", "6ece58", "b5de2b", "fde725",
)  # fmt: skip


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` (same folder, same suffix) to write to; renamed to
    ``path`` when the block ends without an exception, removed otherwise."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:8]}.tmp{final.suffix}")
    try:
        yield os.fspath(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _columns(coords: np.ndarray, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2) level-0 (x, y), got shape {c.shape}")
    out = {"x": c[:, 0], "y": c[:, 1]}
    for name, values in columns.items():
        v = np.asarray(values)
        if name in out:
            raise ValueError(f"column name {name!r} is reserved for the patch coordinates")
        if v.shape[0] != c.shape[0]:
            raise ValueError(f"column {name!r} has {v.shape[0]} rows for {c.shape[0]} patches")
        if v.ndim == 2:  # e.g. class probabilities: one column per component
            out.update({f"{name}_{j}": v[:, j] for j in range(v.shape[1])})
        else:
            out[name] = v.reshape(-1)
    return out


def write_csv(
    path: str | os.PathLike, coords: np.ndarray, columns: Mapping[str, np.ndarray]
) -> str:
    """Per-patch table: columns ``x, y`` (level-0 top-left) then each named value column."""
    path = os.fspath(path)
    cols = _columns(coords, columns)
    names = list(cols)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        w.writerows(zip(*(cols[n].tolist() for n in names)))
    return path


def write_parquet(
    path: str | os.PathLike, coords: np.ndarray, columns: Mapping[str, np.ndarray]
) -> str:
    """Per-patch table as Parquet (needs pyarrow)."""
    path = os.fspath(path)
    if importlib.util.find_spec("pyarrow") is None:
        raise ImportError(
            f"cannot write {path}: Parquet export needs pyarrow (pip install pyarrow); "
            "CSV works without it"
        )
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = _columns(coords, columns)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({k: np.ascontiguousarray(v) for k, v in cols.items()}), tmp)
    return path


def write_table(
    path: str | os.PathLike, coords: np.ndarray, columns: Mapping[str, np.ndarray]
) -> str:
    """Write a per-patch table, format from the suffix: ``.csv`` or ``.parquet``."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".csv":
        return write_csv(path, coords, columns)
    if suffix in (".parquet", ".pq"):
        return write_parquet(path, coords, columns)
    raise ValueError(f"{os.fspath(path)}: unknown table format {suffix!r} (use .csv or .parquet)")


def colormap_lut(cmap: str | np.ndarray = "viridis", n: int = 256) -> np.ndarray:
    """(n, 4) uint8 RGBA lookup table for ``"viridis"``, ``"gray"`` or an (m, 3|4) array."""
    if isinstance(cmap, str):
        if cmap == "viridis":
            anchors = np.array(
                [[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _VIRIDIS_10], float
            )
        elif cmap in ("gray", "grey"):
            anchors = np.array([[0, 0, 0], [255, 255, 255]], float)
        else:
            raise ValueError(f"unknown colormap {cmap!r}: use 'viridis', 'gray' or an (n, 3) array")
    else:
        anchors = np.asarray(cmap, dtype=float)
        if anchors.ndim != 2 or anchors.shape[1] not in (3, 4):
            raise ValueError(f"a colormap array must be (n, 3) or (n, 4), got {anchors.shape}")
        if anchors.max() <= 1.0:
            anchors = anchors * 255
    if anchors.shape[1] == 3:
        anchors = np.hstack([anchors, np.full((len(anchors), 1), 255.0)])
    t = np.linspace(0, len(anchors) - 1, n)
    lut = np.stack([np.interp(t, np.arange(len(anchors)), anchors[:, j]) for j in range(4)], 1)
    return np.round(lut).astype(np.uint8)


def apply_colormap(
    data: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | np.ndarray = "viridis",
    opacity: float = 1.0,
) -> np.ndarray:
    """(H, W, 4) uint8 RGBA image of a float raster; NaN cells are fully transparent.

    ``vmin``/``vmax`` default to the finite data range.
    """
    d = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(d)
    lo = float(np.min(d[finite])) if vmin is None and finite.any() else (vmin or 0.0)
    hi = (
        float(np.max(d[finite]))
        if vmax is None and finite.any()
        else (1.0 if vmax is None else vmax)
    )
    lut = colormap_lut(cmap)
    span = hi - lo if hi > lo else 1.0
    t = np.clip((np.where(finite, d, lo) - lo) / span, 0.0, 1.0)
    rgba = lut[np.round(t * (len(lut) - 1)).astype(np.int64)]
    rgba[..., 3] = np.where(finite, np.round(rgba[..., 3] * float(opacity)), 0).astype(np.uint8)
    return rgba


def write_heatmap_png(
    path: str | os.PathLike,
    raster: Raster,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | np.ndarray = "viridis",
    opacity: float = 1.0,
    upscale: int = 1,
    sidecar: bool = True,
) -> str:
    """Write a heatmap raster as an RGBA PNG, one pixel per cell (× ``upscale``, nearest).

    With ``sidecar`` a ``<path>.json`` records how to place it on the slide: level-0 origin of
    cell (0, 0), cell size in level-0 px, the napari scale/translate and the value range.
    """
    from PIL import Image

    path = os.fspath(path)
    rgba = apply_colormap(raster.data, vmin, vmax, cmap, opacity)
    if upscale > 1:
        rgba = np.repeat(np.repeat(rgba, upscale, axis=0), upscale, axis=1)
    with atomic_path(path) as tmp:
        Image.fromarray(rgba).save(tmp, format="PNG")
    if sidecar:
        g = raster.grid
        finite = raster.data[np.isfinite(raster.data)]
        meta = {
            "origin_level0_xy": [g.x0, g.y0],
            "cell_level0_px": g.cell / upscale,
            "scale_yx": [s / upscale for s in g.scale],
            "translate_yx": [t + (0.5 / upscale - 0.5) * s for t, s in zip(g.translate, g.scale)],
            "unit": g.unit,
            "mpp": g.mpp,
            "vmin": vmin if vmin is not None else (float(finite.min()) if finite.size else None),
            "vmax": vmax if vmax is not None else (float(finite.max()) if finite.size else None),
            "colormap": cmap if isinstance(cmap, str) else "custom",
        }
        with atomic_path(path + ".json") as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
    return path


# ------------------------------------------------------------------- full-resolution maps
#: Output tile side of the map TIFFs (pixels).
MAP_TILE = 256


def map_downsamples(level0_size: Sequence[int], downsample: float = 1.0,
                    min_side: int = 512) -> list[float]:  # fmt: skip
    """Downsamples (level-0 px per output pixel) of a map pyramid: ``downsample``, then ×2 per
    level while the level's longer side stays at least ``min_side`` pixels."""
    if downsample <= 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    w, h = (int(v) for v in level0_size)
    out = [float(downsample)]
    while max(w, h) / (out[-1] * 2) >= min_side:
        out.append(out[-1] * 2)
    return out


def _map_shape(level0_size: Sequence[int], downsample: float) -> tuple[int, int]:
    """(height, width) of a map at ``downsample`` covering the whole slide."""
    w, h = (int(v) for v in level0_size)
    return max(1, int(np.ceil(h / downsample))), max(1, int(np.ceil(w / downsample)))


def sample_raster(raster: Raster, rows: np.ndarray, cols: np.ndarray, downsample: float = 1.0,
                  fill: float | int | None = None) -> np.ndarray:  # fmt: skip
    """Values of a patch raster at output pixels ``rows`` × ``cols`` of a map at ``downsample``.

    Output pixel ``(r, c)`` shows the level-0 pixel under its centre,
    ``floor((c + 0.5)·downsample)`` (x) and ``floor((r + 0.5)·downsample)`` (y) (pixel ``c`` at
    downsample 1), and that pixel takes the value of the raster cell covering it: the value of
    the patch there (see :mod:`.heatmap` for the geometry). Pixels outside every patch get
    ``fill`` (default NaN for float rasters, 0 for labels)."""
    g = raster.grid
    data = raster.data
    if fill is None:
        fill = np.nan if data.dtype.kind == "f" else 0
    py = np.floor((np.asarray(rows, np.float64) + 0.5) * downsample).astype(np.int64)
    px = np.floor((np.asarray(cols, np.float64) + 0.5) * downsample).astype(np.int64)
    cr = np.floor_divide(py - g.y0, g.cell)
    cc = np.floor_divide(px - g.x0, g.cell)
    okr = (cr >= 0) & (cr < data.shape[0])
    okc = (cc >= 0) & (cc < data.shape[1])
    out = np.full((len(py), len(px)), fill, dtype=data.dtype)
    if okr.any() and okc.any():
        out[np.ix_(okr, okc)] = data[np.ix_(cr[okr], cc[okc])]
    return out


def _map_dtype(raster: Raster) -> np.dtype:
    if raster.data.dtype.kind == "f":
        return np.dtype(np.float32)
    top = int(raster.data.max(initial=0))
    return np.dtype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)


class ExportCancelled(Exception):
    """A map export was stopped (its ``stop`` event set); nothing was left under its name."""


def map_tile_count(level0_size: Sequence[int], downsample: float = 1.0, pyramid: bool = True,
                   tile: int = MAP_TILE) -> int:  # fmt: skip
    """How many tiles :func:`write_map_tiff` writes (for progress)."""
    downs = map_downsamples(level0_size, downsample) if pyramid else [float(downsample)]
    total = 0
    for d in downs:
        h, w = _map_shape(level0_size, d)
        total += -(-h // tile) * -(-w // tile)
    return total


def _map_tiles(raster: Raster, shape: tuple[int, int], downsample: float, dtype: np.dtype,
               tile: int, tick: Any = None) -> Iterator[np.ndarray]:  # fmt: skip
    """The level's tiles, row by row (edge tiles padded to ``tile`` × ``tile``)."""
    h, w = shape
    fill = np.nan if dtype.kind == "f" else 0
    for r0 in range(0, h, tile):
        rows = np.arange(r0, r0 + tile)
        for c0 in range(0, w, tile):
            if tick is not None:
                tick()
            block = sample_raster(raster, rows, np.arange(c0, c0 + tile), downsample, fill)
            block[rows >= h, :] = fill
            block[:, np.arange(c0, c0 + tile) >= w] = fill
            yield block.astype(dtype, copy=False)


def write_map_tiff(
    path: str | os.PathLike,
    raster: Raster,
    level0_size: Sequence[int],
    downsample: float = 1.0,
    pyramid: bool = True,
    mpp: float | None = None,
    metadata: Mapping | None = None,
    tile: int = MAP_TILE,
    progress: Callable[[int, int], None] | None = None,
    stop: Any = None,
) -> str:
    """A map of a patch raster over the whole slide as a tiled TIFF, streamed tile by tile.

    The first page covers the slide's level 0 (``level0_size`` = (width, height)) at
    ``downsample`` level-0 pixels per pixel (1: the slide's full resolution); with ``pyramid``
    reduced levels (×2 each, :func:`map_downsamples`) follow as SubIFDs, as in pyramidal
    OME/QuPath TIFFs. Pixels hold the values themselves: float32 heatmaps (NaN where no patch
    lies) or unsigned integer labels (class or cluster ``i`` painted ``i + 1``, 0 = none), each
    pixel the value of the patch under its centre (:func:`sample_raster`). The resolution tags
    give µm/px when ``mpp`` (level 0) is known; ``metadata`` (JSON) goes in the image
    description with the downsamples. Written atomically; returns the path.

    ``progress(done, total)`` is called before each tile (from the writing thread); setting
    ``stop`` (a ``threading.Event``) raises :class:`ExportCancelled` at the next tile."""
    import tifffile

    path = os.fspath(path)
    dtype = _map_dtype(raster)
    downs = map_downsamples(level0_size, downsample) if pyramid else [float(downsample)]
    total = map_tile_count(level0_size, downsample, pyramid, tile)
    done = [0]

    def tick() -> None:
        if stop is not None and stop.is_set():
            raise ExportCancelled(f"{path}: export cancelled")
        if progress is not None:
            progress(done[0], total)
        done[0] += 1

    desc = {"level0_size": [int(v) for v in level0_size], "downsamples": downs,
            "mpp_level0": mpp, **dict(metadata or {})}  # fmt: skip
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, d in enumerate(downs):
            shape = _map_shape(level0_size, d)
            extra: dict = {}
            if mpp:
                px_per_cm = 1e4 / (mpp * d)
                extra.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            if i == 0:
                extra.update(subifds=len(downs) - 1, description=json.dumps(desc),
                             metadata=None)  # fmt: skip
            else:
                extra.update(subfiletype=1, metadata=None)
            tif.write(_map_tiles(raster, shape, d, dtype, tile, tick), shape=shape, dtype=dtype,
                      tile=(tile, tile), compression="zlib", photometric="minisblack",
                      **extra)  # fmt: skip
    if progress is not None:
        progress(total, total)
    return path
