"""QuPath GeoJSON in and out, and patch results as GeoJSON.

Reading accepts what QuPath writes: a ``FeatureCollection``, a bare list of features, or a
single feature. Coordinates are level-0 pixels in QuPath's convention (pixel ``i`` spans
``[i, i+1)``). Classes come from ``properties.classification`` as ``{"name", "color": [r, g, b]}``
or, from older QuPath, ``{"name", "colorRGB": <packed signed int>}``; the object type from
``properties.objectType`` or the legacy feature ``id`` (``PathAnnotationObject`` …). Classes whose
name starts with ``Ignore`` (QuPath's ``Ignore*``) are kept and flagged ``excluded``.

Round trip: :func:`read_geojson` → :class:`Annotation` → :func:`write_geojson` →
:func:`read_geojson` gives the same geometry, class, colour, object type, feature id and all
other properties and feature members. Colours are written in the modern ``color`` form.

Export: :func:`patch_features` (one square per patch with a measurements dict) and
:func:`class_polygons` (patch squares merged per class: the labels raster of
``napari_gpfm.analyses.labels_raster`` traced into rectilinear polygons with holes, exact area,
no shapely needed). This module does not import ``analyses`` (independent sibling layers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from napari_gpfm.errors import NapariGpfmError

__all__ = [
    "GeoJSONError",
    "Annotation",
    "read_geojson",
    "write_geojson",
    "annotations_from_geojson",
    "annotations_to_geojson",
    "patch_features",
    "class_polygons",
    "trace_mask",
    "polygon_area",
    "is_ignored_class",
]

Ring = np.ndarray  # (n, 2) float64 level-0 (x, y), closed (first == last)
Polygon = list  # [exterior ring, hole rings...]

_LEGACY_TYPES = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tma_core",
}


class GeoJSONError(NapariGpfmError, ValueError):
    """A GeoJSON file or object cannot be read (the message names the file and the place)."""


@dataclass(eq=False)
class Annotation:
    """One QuPath object.

    ``polygons`` is a list of polygons, each ``[exterior, hole, ...]`` of closed (n, 2) float64
    rings in level-0 (x, y); ``geometry_type`` is "Polygon" or "MultiPolygon". Other geometry
    types (points, lines) keep their GeoJSON dict in ``raw_geometry`` and no polygons.
    ``properties`` holds every other property verbatim (name, measurements, isLocked, ...),
    ``classification_extra`` any unknown classification keys, ``extra`` other feature members.
    """

    polygons: list[Polygon]
    geometry_type: str = "Polygon"
    class_name: str | None = None
    color: tuple[int, int, int] | None = None
    object_type: str = "annotation"
    id: Any = None
    properties: dict = field(default_factory=dict)
    classification_extra: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    raw_geometry: dict | None = None

    @property
    def excluded(self) -> bool:
        """True for QuPath ``Ignore*`` classes: kept in files, never used as training labels."""
        return is_ignored_class(self.class_name)

    @property
    def area(self) -> float:
        """Area in level-0 pixels² (holes subtracted)."""
        return float(sum(polygon_area(p) for p in self.polygons))


def is_ignored_class(name: str | None) -> bool:
    """QuPath's convention: classes named ``Ignore*`` mark regions to leave out."""
    return bool(name) and name.startswith("Ignore")


# --- geometry helpers -----------------------------------------------------------------------


def _ring(coords: Any, where: str) -> Ring:
    r = np.asarray(coords, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2 or r.shape[0] < 3:
        raise GeoJSONError(f"{where}: a polygon ring needs at least 3 [x, y] positions")
    r = r[:, :2]
    if not np.array_equal(r[0], r[-1]):
        r = np.vstack([r, r[:1]])
    return r


def ring_signed_area(ring: Ring) -> float:
    """Shoelace area of a closed ring in (x, y); positive = counter-clockwise with y up."""
    x, y = ring[:, 0], ring[:, 1]
    return float(0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def polygon_area(polygon: Polygon) -> float:
    """Area of ``[exterior, holes...]`` (absolute values, holes subtracted)."""
    return abs(ring_signed_area(polygon[0])) - sum(abs(ring_signed_area(h)) for h in polygon[1:])


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _ring_json(ring: Ring) -> list:
    return [[_num(x), _num(y)] for x, y in ring.tolist()]


# --- reading ----------------------------------------------------------------------------------


def _rgb_from_packed(value: int) -> tuple[int, int, int]:
    v = int(value) & 0xFFFFFFFF
    return ((v >> 16) & 255, (v >> 8) & 255, v & 255)


def _feature_to_annotation(feat: Mapping, where: str) -> Annotation:
    if not isinstance(feat, Mapping) or feat.get("type") != "Feature":
        raise GeoJSONError(f"{where}: expected a GeoJSON Feature, got {type(feat).__name__}")
    geom = feat.get("geometry")
    props = dict(feat.get("properties") or {})
    extra = {k: v for k, v in feat.items() if k not in ("type", "geometry", "properties", "id")}
    fid = feat.get("id")
    object_type = props.pop("objectType", None)
    if object_type is None:
        object_type = _LEGACY_TYPES.get(fid, "annotation") if isinstance(fid, str) else "annotation"
    cls = props.pop("classification", None)
    class_name, color, cls_extra = None, None, {}
    if isinstance(cls, Mapping):
        cls = dict(cls)
        class_name = cls.pop("name", None)
        if "color" in cls:
            c = cls.pop("color")
            color = tuple(int(v) for v in c[:3])
        elif "colorRGB" in cls:
            color = _rgb_from_packed(cls.pop("colorRGB"))
        cls_extra = cls
    elif isinstance(cls, str):  # some tools write a bare class name
        class_name = cls
    if not isinstance(geom, Mapping):
        raise GeoJSONError(f"{where}: feature has no geometry")
    gtype = geom.get("type")
    polygons: list[Polygon] = []
    raw = None
    try:
        if gtype == "Polygon":
            polygons = [[_ring(r, where) for r in geom["coordinates"]]]
        elif gtype == "MultiPolygon":
            polygons = [[_ring(r, where) for r in poly] for poly in geom["coordinates"]]
        else:
            raw = dict(geom)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, GeoJSONError):
            raise
        raise GeoJSONError(f"{where}: malformed {gtype} coordinates ({exc})") from exc
    return Annotation(
        polygons=polygons,
        geometry_type=gtype,
        class_name=class_name,
        color=color,
        object_type=object_type,
        id=fid,
        properties=props,
        classification_extra=cls_extra,
        extra=extra,
        raw_geometry=raw,
    )


def annotations_from_geojson(obj: Any, source: str = "<geojson>") -> list[Annotation]:
    """Annotations from a parsed GeoJSON object (FeatureCollection, feature list or feature)."""
    if isinstance(obj, Mapping) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features") or []
    elif isinstance(obj, Mapping) and obj.get("type") == "Feature":
        feats = [obj]
    elif isinstance(obj, list):
        feats = obj
    else:
        raise GeoJSONError(f"{source}: expected a FeatureCollection or a list of features")
    return [_feature_to_annotation(f, f"{source}, feature {i}") for i, f in enumerate(feats)]


def read_geojson(path: str | os.PathLike) -> list[Annotation]:
    """Read a QuPath GeoJSON file (``.geojson``/``.json``) into :class:`Annotation` objects."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise GeoJSONError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise GeoJSONError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    return annotations_from_geojson(obj, path)


# --- writing ----------------------------------------------------------------------------------


def _annotation_to_feature(a: Annotation) -> dict:
    if a.raw_geometry is not None:
        geom = a.raw_geometry
    elif a.geometry_type == "Polygon" and len(a.polygons) == 1:
        geom = {"type": "Polygon", "coordinates": [_ring_json(r) for r in a.polygons[0]]}
    else:
        geom = {
            "type": "MultiPolygon",
            "coordinates": [[_ring_json(r) for r in p] for p in a.polygons],
        }
    props = {"objectType": a.object_type}
    if a.class_name is not None or a.color is not None or a.classification_extra:
        cls: dict = {}
        if a.class_name is not None:
            cls["name"] = a.class_name
        if a.color is not None:
            cls["color"] = [int(v) for v in a.color]
        cls.update(a.classification_extra)
        props["classification"] = cls
    props.update(a.properties)
    feat = {"type": "Feature"}
    if a.id is not None:
        feat["id"] = a.id
    feat["geometry"] = geom
    feat["properties"] = props
    feat.update(a.extra)
    return feat


def annotations_to_geojson(annotations: Iterable[Annotation]) -> dict:
    """A GeoJSON FeatureCollection (dict) of the annotations."""
    return {
        "type": "FeatureCollection",
        "features": [_annotation_to_feature(a) for a in annotations],
    }


def write_geojson(
    path: str | os.PathLike, annotations: Iterable[Annotation], as_collection: bool = True
) -> str:
    """Write annotations to ``path``; ``as_collection=False`` writes a bare feature list."""
    path = os.fspath(path)
    obj: Any = annotations_to_geojson(annotations)
    if not as_collection:
        obj = obj["features"]
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)
    return path


# --- patch results -> GeoJSON -------------------------------------------------------------


def _rgb255(colours: Sequence | np.ndarray | None) -> np.ndarray | None:
    """(C, 3) int colours from 0-255 values, or from 0-1 floats when every value is ≤ 1."""
    if colours is None:
        return None
    c = np.asarray(colours, dtype=np.float64)[:, :3]
    if np.asarray(colours).dtype.kind == "f" and c.max() <= 1.0:
        c = c * 255
    return np.clip(np.round(c), 0, 255).astype(int)


def _class_fields(
    i: int, class_names: Sequence[str] | None, rgb: np.ndarray | None
) -> tuple[str, tuple | None]:
    name = class_names[i] if class_names is not None else str(i)
    return name, None if rgb is None else tuple(int(v) for v in rgb[i])


def patch_features(
    coords: np.ndarray,
    patch_size_level0: int,
    measurements: Mapping[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    colours: Sequence | np.ndarray | None = None,
    object_type: str = "detection",
) -> list[Annotation]:
    """One square polygon per patch (QuPath detections by default) with measurements.

    ``measurements`` maps a name to one value per patch (written into QuPath's
    ``measurements`` dict); ``labels`` (index into ``class_names``, -1 = none) set the class and
    colour (``colours``: (C, 3) RGB, 0-255, or floats 0-1).
    """
    c = np.asarray(coords, dtype=np.int64)
    P = int(patch_size_level0)
    meas = {k: np.asarray(v).reshape(-1) for k, v in (measurements or {}).items()}
    rgb = _rgb255(colours)
    for k, v in meas.items():
        if v.shape[0] != c.shape[0]:
            raise ValueError(f"measurement {k!r} has {v.shape[0]} values for {c.shape[0]} patches")
    out = []
    for i, (x, y) in enumerate(c.tolist()):
        ring = np.array([[x, y], [x + P, y], [x + P, y + P], [x, y + P], [x, y]], dtype=np.float64)
        name = col = None
        if labels is not None and labels[i] >= 0:
            name, col = _class_fields(int(labels[i]), class_names, rgb)
        props = {"measurements": {k: float(v[i]) for k, v in meas.items()}} if meas else {}
        out.append(Annotation([[ring]], "Polygon", name, col, object_type, properties=props))
    return out


def class_polygons(
    raster: Any,
    class_names: Sequence[str] | None = None,
    colours: Sequence | np.ndarray | None = None,
    shift: int = 1,
    object_type: str = "annotation",
) -> list[Annotation]:
    """Merge patch squares per class into (Multi)Polygons with holes, one annotation per class.

    ``raster`` is a labels raster on the patch grid, as made by
    ``napari_gpfm.analyses.labels_raster`` (``.data`` int with 0 = background and class
    ``i`` painted as ``i + shift``; ``.grid`` with level-0 ``x0``, ``y0`` and ``cell``). Each
    class mask is traced along cell edges, so the polygon area equals the painted area exactly.
    Cells touching only at a corner become separate polygons (4-connectivity).
    """
    data = np.asarray(raster.data)
    g = raster.grid
    rgb = _rgb255(colours)
    out = []
    for value in np.unique(data[data > 0]).tolist():
        polys = trace_mask(data == value, origin=(g.x0, g.y0), cell=g.cell)
        name, col = _class_fields(value - shift, class_names, rgb)
        gtype = "Polygon" if len(polys) == 1 else "MultiPolygon"
        out.append(Annotation(polys, gtype, name, col, object_type))
    return out


# --- boolean raster -> polygons ------------------------------------------------------------

# Directed boundary edges of a foreground cell (r, c) whose neighbour is background, as
# (neighbour dr, dc, start vertex, end vertex) in (x=col, y=row) corner units. Walking them,
# the foreground is on the right in a y-down image, so outer rings have positive shoelace area.
_EDGES = (
    (-1, 0, (0, 0), (1, 0)),  # top, +x
    (0, 1, (1, 0), (1, 1)),  # right, +y
    (1, 0, (1, 1), (0, 1)),  # bottom, -x
    (0, -1, (0, 1), (0, 0)),  # left, -y
)


def trace_mask(
    mask: np.ndarray, origin: tuple[float, float] = (0, 0), cell: float = 1
) -> list[Polygon]:
    """Trace a boolean raster into polygons with holes along cell edges.

    Cell (r, c) is the square ``[x0 + c·cell, x0 + (c+1)·cell] × [y0 + r·cell, …]`` with
    ``origin = (x0, y0)``. Returns ``[[exterior, hole, ...], ...]`` (closed (n, 2) float64
    rings, collinear vertices removed), one polygon per 4-connected component; exteriors have
    positive shoelace area, holes negative. A hole touching its exterior at one corner is
    returned as a separate hole ring (OGC-valid), never as a self-touching exterior.
    """
    m = np.asarray(mask, dtype=bool)
    comp, _ = ndimage.label(m)  # 4-connectivity
    pad = np.pad(m, 1)
    # collect directed edges: start vertex -> list of (end vertex, component)
    starts, ends, comps = [], [], []
    rr, cc = np.nonzero(m)
    for dr, dc, (sx, sy), (ex, ey) in _EDGES:
        bg = ~pad[rr + 1 + dr, cc + 1 + dc]
        r, c = rr[bg], cc[bg]
        starts.append(np.stack([c + sx, r + sy], 1))
        ends.append(np.stack([c + ex, r + ey], 1))
        comps.append(comp[r, c])
    if not rr.size:
        return []
    starts_a = np.concatenate(starts)
    ends_a = np.concatenate(ends)
    comps_a = np.concatenate(comps)
    outgoing: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(map(tuple, starts_a.tolist())):
        outgoing.setdefault(key, []).append(i)
    # successor of each edge: the only edge leaving its end vertex, or at a pinch vertex (two
    # cells touching at a corner) the one turning right, which keeps to the same cell
    succ = np.empty(len(starts_a), dtype=np.int64)
    for i, end in enumerate(map(tuple, ends_a.tolist())):
        cand = outgoing[end]
        succ[i] = cand[0] if len(cand) == 1 else _right_turn(starts_a[i], ends_a[i], cand, ends_a)
    used = np.zeros(len(starts_a), dtype=bool)
    rings_by_comp: dict[int, list] = {}
    for first in range(len(starts_a)):
        if used[first]:
            continue
        verts, e = [], first
        while not used[e]:
            used[e] = True
            verts.append(tuple(starts_a[e].tolist()))
            e = succ[e]
        for loop in _split_at_repeats(verts):
            rings_by_comp.setdefault(int(comps_a[first]), []).append(loop)
    x0, y0 = origin
    polygons = []
    for label in sorted(rings_by_comp):
        rings = [np.asarray(r, dtype=np.float64) for r in rings_by_comp[label]]
        areas = [ring_signed_area(r) for r in rings]
        outer = [r for r, a in zip(rings, areas) if a > 0]
        holes = [r for r, a in zip(rings, areas) if a < 0]
        for ext in outer:  # one per 4-connected component
            poly = [ext] + holes
            polygons.append([_simplify(r) * cell + (x0, y0) for r in poly])
            holes = []
    return polygons


def _right_turn(start, end, cand: list[int], ends_a: np.ndarray) -> int:
    """Among outgoing edges at a pinch vertex, take the one turning right (keeps to one cell)."""
    d = end - start
    right = np.array([-d[1], d[0]])  # in a y-down frame, facing d, the right hand points here
    for j in cand:
        if np.array_equal(ends_a[j] - end, right):
            return j
    return cand[0]


def _split_at_repeats(verts: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Split a closed vertex walk that revisits a vertex into simple closed loops."""
    loops: list[list] = []
    stack: list = []
    seen: dict = {}
    for v in verts + [verts[0]]:
        if v in seen:
            i = seen[v]
            loop = stack[i:] + [v]
            for u in stack[i + 1 :]:
                seen.pop(u, None)
            stack = stack[: i + 1]
            if len(loop) > 3:
                loops.append(loop)
        else:
            seen[v] = len(stack)
            stack.append(v)
    return loops


def _simplify(ring: np.ndarray) -> np.ndarray:
    """Drop vertices lying on a straight line between their neighbours (ring stays closed)."""
    pts = ring[:-1]
    prev = np.roll(pts, 1, axis=0)
    nxt = np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (
        nxt[:, 0] - pts[:, 0]
    )
    keep = pts[cross != 0]
    return np.vstack([keep, keep[:1]])
