"""Export per-patch tables (CSV, Parquet) and heatmap rasters (RGBA PNG overlays).

Colormap choice: a built-in viridis lookup table, so exports look the same with or without
matplotlib (not a dependency of this package). It is linear interpolation between ten evenly
spaced samples of viridis (the CC0 colormap by van der Walt & Smith), within a couple of
8-bit levels of the reference. ``"gray"`` and any (n, 3)/(n, 4) array LUT are accepted too.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Mapping

import numpy as np

from .heatmap import Raster

__all__ = [
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
    with open(path, "w", newline="", encoding="utf-8") as fh:
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
    pq.write_table(pa.table({k: np.ascontiguousarray(v) for k, v in cols.items()}), path)
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
    Image.fromarray(rgba).save(path, format="PNG")
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
        with open(path + ".json", "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
    return path
