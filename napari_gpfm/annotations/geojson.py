"""QuPath GeoJSON in and out, and patch results as GeoJSON.

Reading accepts what QuPath (0.2 to 0.6) and other tools write: a ``FeatureCollection``, a bare
list of features, a single ``Feature``, or a bare geometry (``Polygon``, ``Point``, …: one
unclassified annotation). Coordinates are level-0 pixels in QuPath's convention (pixel ``i``
spans ``[i, i+1)``). Classes come from ``properties.classification``: ``{"name", "color": [r, g,
b]}`` (or ``[r, g, b, a]``: the alpha is kept in :attr:`Annotation.alpha`), older QuPath's
``{"name", "colorRGB": <packed signed int>}``, QuPath's derived classes ``{"names": ["A", "B"],
...}`` (read as class ``"A: B"``, as QuPath shows it), or a bare class name; ``null`` is
unclassified. The object type comes from ``properties.objectType`` or the legacy feature ``id``
(``PathAnnotationObject`` …). Classes whose name starts with ``Ignore`` (QuPath's ``Ignore*``) are
kept and flagged ``excluded``.

Round trip: :func:`read_geojson` → :func:`write_geojson` writes back every member it does not
use, at every level: FeatureCollection members (``bbox``, ``crs``, …), feature members
(``nucleusGeometry``, …), properties, classification members, and geometry members
(``isEllipse``, ``plane``, from which QuPath rebuilds ellipses and z/t planes). What was read is
written the way it came as long as it is unchanged: a ``colorRGB`` stays packed, a ``names``
class stays an array, ``classification: null`` stays ``null``, a legacy file gets no
``objectType`` it did not have, and a bare Feature, list or geometry is written bare again
(:class:`AnnotationList` remembers the container). Changed or new classes are written in
QuPath's current form (``{"name", "color"}``; ``{"names", "color"}`` for a derived class
``"A: B"``).

Documented normalisations (the only differences a round trip may show, besides whitespace and
key order, see ``tests/annotations/test_qupath_exports.py``):

- polygon coordinates pass through float64: a number is written back with the same value, as an
  int when it is integral (``26388.0`` → ``26388``);
- an unclosed polygon ring is closed (its first position repeated at the end) and a third
  (z) coordinate of a polygon position is dropped (QuPath writes neither; it uses ``plane``).

Export: :func:`patch_features` (one square per patch with a measurements dict) and
:func:`class_polygons` (patch squares merged per class: the labels raster of
``napari_gpfm.analyses.labels_raster`` traced into rectilinear polygons with holes, exact area,
no shapely needed). This module does not import ``analyses`` (independent sibling layers).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from napari_gpfm.errors import NapariGpfmError

__all__ = [
    "GeoJSONError",
    "GeoJSONWarning",
    "Annotation",
    "AnnotationList",
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
_KNOWN_TYPES = ("annotation", "detection", "cell", "tile", "tmaCore", "tma_core", "root")
GEOMETRY_TYPES = (
    "Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
    "GeometryCollection",
)  # fmt: skip
# containers a file can have (AnnotationList.container)
COLLECTION, FEATURES, FEATURE, GEOMETRY = "FeatureCollection", "features", "Feature", "geometry"


#: Coordinates beyond this many level-0 pixels lie outside any slide (a 75 mm slide at
#: 0.05 µm/px is 1.5 million px long); reported when the caller gives no slide size.
FAR_OUTSIDE = 10_000_000
#: Feature indices listed in one note before "…".
_LISTED = 10


class GeoJSONError(NapariGpfmError, ValueError):
    """A GeoJSON file or object cannot be read (the message names the file and the place)."""


class GeoJSONWarning(UserWarning):
    """Something in a GeoJSON file takes no part in what napari-gpfm does with it (shapes that
    are not areas, coordinates outside the slide, no classes), or a non-finite value was
    written as ``null``; the message names the file and the features. The same text is in
    :attr:`AnnotationList.notes`."""


@dataclass(eq=False)
class Annotation:
    """One QuPath object.

    ``polygons`` is a list of polygons, each ``[exterior, hole, ...]`` of closed (n, 2) float64
    rings in level-0 (x, y); ``geometry_type`` is "Polygon" or "MultiPolygon". Other geometry
    types (points, lines) keep their GeoJSON dict in ``raw_geometry`` and no polygons.
    ``properties`` holds every other property verbatim (name, measurements, isLocked, ...),
    ``classification_extra`` any unknown classification keys, ``extra`` other feature members,
    ``geometry_extra`` the members of a (Multi)Polygon geometry other than ``type`` and
    ``coordinates`` (QuPath's ``isEllipse``, ``plane``). ``color`` is the class colour (RGB
    0-255) and ``alpha`` its fourth component when the file gave one.

    ``source`` records how the file wrote what was parsed (the classification as it came,
    whether ``objectType`` was written, key order), so that an unchanged annotation is written
    back as it came; it is empty for annotations made here.
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
    alpha: int | None = None
    geometry_extra: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict, repr=False)

    @property
    def excluded(self) -> bool:
        """True for QuPath ``Ignore*`` classes: kept in files, never used as training labels."""
        return is_ignored_class(self.class_name)

    @property
    def area(self) -> float:
        """Area in level-0 pixels² (holes subtracted)."""
        return float(sum(polygon_area(p) for p in self.polygons))


class AnnotationList(list):
    """The annotations of one file, with what the file held around them.

    ``container`` is how the file held its objects: ``"FeatureCollection"``, ``"features"`` (a
    bare list), ``"Feature"`` (one bare feature) or ``"geometry"`` (one bare geometry);
    ``extra`` the FeatureCollection's members other than ``type`` and ``features``.
    :func:`write_geojson` writes the same container back (when the count still fits it).
    ``notes`` lists what the reader reports without refusing the file (each note names the
    file and the features; shown by the caller, and warned as :class:`GeoJSONWarning`).
    """

    def __init__(
        self, items: Iterable[Annotation] = (), container: str = COLLECTION,
        extra: Mapping | None = None, notes: Iterable[str] = (),
    ) -> None:  # fmt: skip
        super().__init__(items)
        self.container = container
        self.extra = dict(extra or {})
        self.notes = list(notes)


def is_ignored_class(name: str | None) -> bool:
    """QuPath's convention: classes named ``Ignore*`` mark regions to leave out."""
    return isinstance(name, str) and name.startswith("Ignore")


# --- geometry helpers -----------------------------------------------------------------------


def _ring(coords: Any, where: str) -> Ring:
    r = np.asarray(coords, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2 or r.shape[0] < 3:
        raise GeoJSONError(f"{where}: a polygon ring needs at least 3 [x, y] positions")
    r = r[:, :2]
    bad = ~np.isfinite(r).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise GeoJSONError(
            f"{where}: position {i} of a polygon ring is {coords[i]!r}, not a finite [x, y] "
            "(NaN or infinity): the shape cannot be placed on the slide"
        )
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


def _ordered(d: dict, order: Sequence[str] | None) -> dict:
    """``d`` with the keys of ``order`` first, in that order (the file's key order)."""
    if not order:
        return d
    out = {k: d[k] for k in order if k in d}
    out.update((k, v) for k, v in d.items() if k not in out)
    return out


# --- classification ---------------------------------------------------------------------------


def _rgb_from_packed(value: int) -> tuple[int, int, int]:
    v = int(value) & 0xFFFFFFFF
    return ((v >> 16) & 255, (v >> 8) & 255, v & 255)


def _kind(v: Any) -> str:
    """How a JSON value is described in messages: ``5 (a number)``, ``['a'] (a list)``."""
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "text", list: "a list",
             dict: "an object", type(None): "null"}  # fmt: skip
    text = repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kinds.get(type(v), type(v).__name__)})"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _colour_ok(c: Any) -> bool:
    return (
        isinstance(c, (list, tuple)) and len(c) in (3, 4)
        and all(_is_number(v) and math.isfinite(v) and 0 <= v <= 255 for v in c)
    )  # fmt: skip


_COLOUR_FORMS = "[r, g, b] or [r, g, b, a] with values 0-255, or a packed integer"


def _parse_classification(cls: Any) -> tuple[str | None, tuple | None, int | None, dict]:
    """(class name, RGB, alpha, unknown members) of a ``classification`` value; a value that
    cannot be a class (a number or list as the class or its name, a colour that is not one)
    raises ``ValueError`` saying what it is (the caller adds the file and feature)."""
    if isinstance(cls, str):  # some tools write a bare class name
        return cls, None, None, {}
    if cls is None:  # unclassified
        return None, None, None, {}
    if not isinstance(cls, Mapping):
        raise ValueError(
            f"'classification' is {_kind(cls)}; expected an object such as "
            '{"name": "Tumor", "color": [200, 0, 0]}, a class name, or null'
        )
    rest = dict(cls)
    name = rest.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise ValueError(f"the class name is {_kind(name)}; a class name must be text")
    names = rest.get("names")
    if names is not None:
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"the class 'names' are {_kind(names)}; expected a list of texts")
        rest.pop("names")
        if name is None and names:  # QuPath's derived class, shown as "A: B"
            name = ": ".join(names)
    color = alpha = None
    if "color" in rest and rest["color"] is not None:
        c = rest.pop("color")
        if _colour_ok(c):
            color = tuple(int(v) for v in c[:3])
            alpha = int(c[3]) if len(c) == 4 else None
        elif isinstance(c, int) and not isinstance(c, bool):
            color = _rgb_from_packed(c)
        else:
            raise ValueError(f"the class colour is {_kind(c)}; expected {_COLOUR_FORMS}")
    elif "colorRGB" in rest and rest["colorRGB"] is not None:
        c = rest.pop("colorRGB")
        if not (isinstance(c, int) and not isinstance(c, bool)):
            raise ValueError(
                f"the class colour 'colorRGB' is {_kind(c)}; expected a packed integer"
            )
        color = _rgb_from_packed(c)
    return name, color, alpha, rest


def _classification_json(a: Annotation) -> tuple[bool, Any]:
    """(write the key?, value) of ``properties.classification`` for ``a``."""
    src = a.source
    now = (a.class_name, a.color, a.alpha, a.classification_extra)
    if "classification" in src and _parse_classification(src["classification"]) == now:
        return True, src["classification"]  # unchanged: exactly as it came
    if a.class_name is None and a.color is None and not a.classification_extra:
        return ("classification" in src), None
    cls: dict = {}
    if a.class_name is not None:
        parts = a.class_name.split(": ")
        if len(parts) > 1 and all(parts):
            cls["names"] = parts  # QuPath's form for a derived class
        else:
            cls["name"] = a.class_name
    if a.color is not None:
        cls["color"] = [int(v) for v in a.color] + ([] if a.alpha is None else [int(a.alpha)])
    cls.update(a.classification_extra)
    return True, cls


# --- reading ----------------------------------------------------------------------------------


def _feature_to_annotation(feat: Mapping, where: str) -> Annotation:
    if not isinstance(feat, Mapping) or feat.get("type") != "Feature":
        raise GeoJSONError(f"{where}: expected a GeoJSON Feature, got {type(feat).__name__}")
    geom = feat.get("geometry")
    raw_props = feat.get("properties")
    if raw_props is not None and not isinstance(raw_props, Mapping):
        raise GeoJSONError(f"{where}: 'properties' must be an object")
    props = dict(raw_props or {})
    source: dict = {
        "feature_keys": list(feat.keys()),
        "property_keys": list(props.keys()),
        "properties_null": "properties" in feat and raw_props is None,
    }
    extra = {k: v for k, v in feat.items() if k not in ("type", "geometry", "properties", "id")}
    fid = feat.get("id")
    object_type = props.pop("objectType", None)
    if object_type is None:  # implied: QuPath's aliases, the legacy id, else an annotation
        alias = props.get("object_type", props.get("type"))
        if isinstance(alias, str) and (alias in _KNOWN_TYPES or alias in _LEGACY_TYPES):
            object_type = _LEGACY_TYPES.get(alias, alias)
        elif isinstance(fid, str):
            object_type = _LEGACY_TYPES.get(fid, "annotation")
        else:
            object_type = "annotation"
        source["implied_object_type"] = object_type
    if "classification" in props:
        source["classification"] = props.pop("classification")
    try:
        class_name, color, alpha, cls_extra = _parse_classification(source.get("classification"))
    except ValueError as exc:
        raise GeoJSONError(f"{where}: {exc}") from None
    if not isinstance(geom, Mapping):
        raise GeoJSONError(f"{where}: feature has no geometry")
    gtype = geom.get("type")
    if not isinstance(gtype, str):
        raise GeoJSONError(f"{where}: the geometry's 'type' is {_kind(gtype)}; expected e.g. "
                           "\"Polygon\"")  # fmt: skip
    polygons: list[Polygon] = []
    raw = None
    geometry_extra: dict = {}
    try:
        if gtype == "Polygon":
            polygons = [_polygon(geom["coordinates"], where)]
        elif gtype == "MultiPolygon":
            if not isinstance(geom["coordinates"], list):
                raise TypeError("'coordinates' is not a list")
            polygons = [_polygon(poly, where) for poly in geom["coordinates"]]
        else:
            raw = dict(geom)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        if isinstance(exc, GeoJSONError):
            raise
        what = "no 'coordinates'" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise GeoJSONError(f"{where}: malformed {gtype} coordinates ({what})") from None
    if raw is None:
        geometry_extra = {k: v for k, v in geom.items() if k not in ("type", "coordinates")}
        source["geometry_keys"] = list(geom.keys())
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
        alpha=alpha,
        geometry_extra=geometry_extra,
        source=source,
    )


def _polygon(rings: Any, where: str) -> Polygon:
    if not isinstance(rings, list) or not rings:
        raise GeoJSONError(
            f"{where}: a polygon needs a list of rings (an exterior, then holes), got "
            f"{_kind(rings)}"
        )
    return [_ring(r, where) for r in rings]


def _feature_safely(feat: Any, where: str) -> Annotation:
    """:func:`_feature_to_annotation`, any failure a :class:`GeoJSONError` naming ``where``."""
    try:
        return _feature_to_annotation(feat, where)
    except GeoJSONError:
        raise
    except RecursionError:
        raise GeoJSONError(f"{where}: nested too deeply to be a GeoJSON feature") from None
    except Exception as exc:  # a value of an unexpected type somewhere in the feature
        raise GeoJSONError(f"{where}: malformed feature ({type(exc).__name__}: {exc})") from None


def _listed(indices: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:_LISTED])
    return shown + (f", … ({len(indices) - _LISTED} more)" if len(indices) > _LISTED else "")


def _notes(anns: Sequence[Annotation], source: str, slide_size: tuple[int, int] | None
           ) -> list[str]:  # fmt: skip
    """What the file holds that takes no part in labels: no feature at all, shapes that are
    not areas, areas outside the slide (or far outside any slide)."""
    notes = []
    if not anns:
        return [f"{source}: the file holds no features"]
    other: dict[str, list[int]] = {}
    for i, a in enumerate(anns):
        if a.raw_geometry is not None:
            other.setdefault(str(a.geometry_type), []).append(i)
    if other:
        n = sum(len(v) for v in other.values())
        by_count = sorted(other.items(), key=lambda kv: -len(kv[1]))
        kinds = ", ".join(f"{len(v)} {k}" for k, v in by_count)
        idx = sorted(i for v in other.values() for i in v)
        notes.append(
            f"{source}: {n} feature{'s are' if n > 1 else ' is'} not an area ({kinds}; "
            f"feature{'s' if n > 1 else ''} {_listed(idx)}) and take{'' if n > 1 else 's'} no "
            "part in patch labels (only Polygon and MultiPolygon do); kept, and written back "
            "unchanged"
        )
    if slide_size is not None:
        w, h = (float(v) for v in slide_size)
        x0, y0, x1, y1 = 0.0, 0.0, w, h
        where = f"outside the slide ({int(w):,} × {int(h):,} px)"
    else:
        x0 = y0 = -FAR_OUTSIDE
        x1 = y1 = FAR_OUTSIDE
        where = f"beyond ±{FAR_OUTSIDE:,} px, outside any slide"
    entirely, partly = [], []
    for i, a in enumerate(anns):
        if not a.polygons:
            continue
        pts = np.concatenate([r for poly in a.polygons for r in poly])
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        if hi[0] <= x0 or hi[1] <= y0 or lo[0] >= x1 or lo[1] >= y1:
            entirely.append(i)
        elif lo[0] < x0 or lo[1] < y0 or hi[0] > x1 or hi[1] > y1:
            partly.append(i)
    if entirely:
        notes.append(
            f"{source}: {len(entirely)} feature{'s lie' if len(entirely) > 1 else ' lies'} "
            f"entirely {where} (feature{'s' if len(entirely) > 1 else ''} {_listed(entirely)}): "
            "they cover no patch. Is this the file of this slide, in level-0 pixels?"
        )
    if partly:
        notes.append(
            f"{source}: {len(partly)} feature{'s reach' if len(partly) > 1 else ' reaches'} "
            f"{where} (feature{'s' if len(partly) > 1 else ''} {_listed(partly)}); only "
            f"{'their' if len(partly) > 1 else 'its'} part on the slide covers patches"
        )
    return notes


def _unclassified_note(anns: Sequence[Annotation], source: str) -> list[str]:
    """A note (not warned: unclassified shapes are fine to view) when no feature has a class."""
    if anns and not any(a.class_name for a in anns):
        return [
            f"{source}: none of the {len(anns)} features has a class "
            "(properties.classification): they can be shown, not used to train a classifier"
        ]
    return []


def annotations_from_geojson(
    obj: Any, source: str = "<geojson>", slide_size: tuple[int, int] | None = None,
    warn: bool = True,
) -> AnnotationList:  # fmt: skip
    """Annotations from a parsed GeoJSON object: a FeatureCollection, a list of features, a
    feature, or a bare geometry (one unclassified annotation).

    Every error is a :class:`GeoJSONError` naming ``source`` and the feature index. What is read
    but takes no part in labels is reported in the result's ``notes`` (and, with ``warn``, as
    one :class:`GeoJSONWarning` each): shapes that are not areas (points, lines, collections),
    with their count; features outside the slide when ``slide_size`` (level-0 width, height)
    is given, else beyond ±10 million px; an empty file; and (a note only, not warned) a
    file without any class.
    """
    extra: dict = {}
    if isinstance(obj, Mapping) and obj.get("type") == "FeatureCollection":
        if "features" not in obj or obj["features"] is None:
            raise GeoJSONError(
                f"{source}: the FeatureCollection has no 'features' member (the list of its "
                "features); the file is incomplete or not a GeoJSON export"
            )
        feats = obj["features"]
        if not isinstance(feats, list):
            raise GeoJSONError(
                f"{source}: 'features' of the FeatureCollection must be a list, got "
                f"{_kind(feats)}"
            )
        extra = {k: v for k, v in obj.items() if k not in ("type", "features")}
        container = COLLECTION
    elif isinstance(obj, Mapping) and obj.get("type") == "Feature":
        feats, container = [obj], FEATURE
    elif isinstance(obj, Mapping) and obj.get("type") in GEOMETRY_TYPES:
        bare = _feature_safely({"type": "Feature", "geometry": obj}, f"{source}, geometry")
        bare.source = {k: v for k, v in bare.source.items() if k in ("geometry_keys",
                                                                    "implied_object_type")}
        out = AnnotationList([bare], GEOMETRY, notes=_notes([bare], source, slide_size))
        _warn_notes(out.notes, warn)
        return out
    elif isinstance(obj, list):
        feats, container = obj, FEATURES
    else:
        what = obj.get("type") if isinstance(obj, Mapping) else type(obj).__name__
        raise GeoJSONError(
            f"{source}: expected a FeatureCollection, a Feature, a list of features or a "
            f"geometry, got {what!r}"
        )
    anns = [_feature_safely(f, f"{source}, feature {i}") for i, f in enumerate(feats)]
    out = AnnotationList(anns, container, extra, _notes(anns, source, slide_size))
    _warn_notes(out.notes, warn)
    out.notes += _unclassified_note(anns, source)
    return out


def _warn_notes(notes: Sequence[str], warn: bool) -> None:
    if warn:
        for note in notes:
            warnings.warn(note, GeoJSONWarning, stacklevel=4)


def read_geojson(
    path: str | os.PathLike, slide_size: tuple[int, int] | None = None, warn: bool = True
) -> AnnotationList:
    """Read a QuPath GeoJSON file (``.geojson``/``.json``) into :class:`Annotation` objects.

    Errors are :class:`GeoJSONError` naming the file (and the feature index); ``slide_size``
    (level-0 width, height) reports features outside the slide (see
    :func:`annotations_from_geojson` for the ``notes``).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as fh:  # UTF-8, with or without a BOM
            obj = json.load(fh)
    except FileNotFoundError:
        raise GeoJSONError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise GeoJSONError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 1]
        raise GeoJSONError(
            f"{path}: not UTF-8 text (byte 0x{bad.hex()} at offset {exc.start} is not UTF-8; "
            "perhaps Latin-1 or Windows-1252). GeoJSON files are UTF-8: save it again as UTF-8 "
            "(QuPath writes UTF-8; or `iconv -f latin1 -t utf-8`)"
        ) from None
    except RecursionError:
        raise GeoJSONError(
            f"{path}: nested too deeply to be read (arrays or objects inside each other more "
            "than about a thousand levels deep): not a GeoJSON export"
        ) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise GeoJSONError(f"{path}: not valid JSON ({exc})") from None
    return annotations_from_geojson(obj, path, slide_size=slide_size, warn=warn)


# --- writing ----------------------------------------------------------------------------------


def _annotation_to_feature(a: Annotation) -> dict:
    src = a.source
    if a.raw_geometry is not None:
        geom = a.raw_geometry
    else:
        if a.geometry_type == "Polygon" and len(a.polygons) == 1:
            geom = {"type": "Polygon", "coordinates": [_ring_json(r) for r in a.polygons[0]]}
        else:
            geom = {
                "type": "MultiPolygon",
                "coordinates": [[_ring_json(r) for r in p] for p in a.polygons],
            }
        geom.update(a.geometry_extra)
        geom = _ordered(geom, src.get("geometry_keys"))
    props: dict = {}
    if src.get("implied_object_type") != a.object_type or "implied_object_type" not in src:
        props["objectType"] = a.object_type
    write_cls, cls = _classification_json(a)
    if write_cls:
        props["classification"] = cls
    props.update(a.properties)
    props = _ordered(props, src.get("property_keys"))
    feat: dict = {"type": "Feature"}
    if a.id is not None or "id" in src.get("feature_keys", ()):
        feat["id"] = a.id
    feat["geometry"] = geom
    if props or not src.get("feature_keys") or "properties" in src["feature_keys"]:
        feat["properties"] = None if (not props and src.get("properties_null")) else props
    feat.update(a.extra)
    return _ordered(feat, src.get("feature_keys"))


def _finite(value: Any, where: str, nulled: list[str], refuse: bool) -> Any:
    """``value`` with every non-finite float (NaN, ±inf: not JSON) replaced by ``None``
    (recorded in ``nulled`` as ``where``), or, with ``refuse``, a :class:`GeoJSONError`."""
    if isinstance(value, float) or isinstance(value, np.floating):
        if math.isfinite(value):
            return value
        if refuse:
            raise GeoJSONError(f"{where} is {float(value)!r}: GeoJSON cannot hold NaN or infinity")
        nulled.append(where)
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v, f"{where}.{k}", nulled, refuse) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", nulled, refuse) for i, v in enumerate(value)]
    return value


def _raw_geojson(annotations: Iterable[Annotation], container: str | None) -> Any:
    extra = getattr(annotations, "extra", {}) or {}
    if container is None:
        container = getattr(annotations, "container", COLLECTION)
    feats = [_annotation_to_feature(a) for a in annotations]
    if container == FEATURES:
        return feats
    if container in (FEATURE, GEOMETRY) and len(feats) == 1:
        return feats[0]["geometry"] if container == GEOMETRY else feats[0]
    if container not in (COLLECTION, FEATURE, GEOMETRY):
        raise ValueError(f"unknown GeoJSON container {container!r}")
    return {"type": "FeatureCollection", "features": feats, **extra}


def _finite_feature(feat: Any, where: str, nulled: list[str]) -> Any:
    """A feature with NaN/inf as null, except in its geometry (refused: a shape with a NaN
    position cannot be placed)."""
    if not isinstance(feat, Mapping):
        return _finite(feat, where, nulled, False)
    return {k: _finite(v, f"{where} {k}", nulled, k == "geometry") for k, v in feat.items()}


def _encode(annotations: Iterable[Annotation], container: str | None
            ) -> tuple[Any, str, list[str]]:  # fmt: skip
    """(GeoJSON object, its JSON text, the places whose NaN/inf were written as null)."""
    obj = _raw_geojson(annotations, container)
    try:
        return obj, json.dumps(obj, allow_nan=False), []  # the common case: one encode
    except ValueError:
        pass
    nulled: list[str] = []
    if isinstance(obj, list):
        obj = [_finite_feature(f, f"feature {i}", nulled) for i, f in enumerate(obj)]
    elif obj.get("type") == "FeatureCollection" and isinstance(obj.get("features"), list):
        rest = {k: v for k, v in obj.items() if k != "features"}
        rest = _finite(rest, "FeatureCollection", nulled, False)
        feats = [_finite_feature(f, f"feature {i}", nulled) for i, f in enumerate(obj["features"])]
        obj = {"type": "FeatureCollection", "features": feats, **rest}
    elif obj.get("type") == "Feature":
        obj = _finite_feature(obj, "feature 0", nulled)
    else:  # a bare geometry
        obj = _finite(obj, "feature 0 geometry", nulled, True)
    return obj, json.dumps(obj, allow_nan=False), nulled


def annotations_to_geojson(annotations: Iterable[Annotation], container: str | None = None) -> Any:
    """The GeoJSON object of the annotations.

    ``container``: ``"FeatureCollection"`` (default for plain sequences), ``"features"`` (a bare
    list), ``"Feature"`` / ``"geometry"`` (one bare feature / geometry; more than one annotation
    gives a FeatureCollection). ``None`` takes the container of an :class:`AnnotationList` (as
    read), whose FeatureCollection members are written back too.

    Never holds NaN or infinity (not JSON): such a measurement or property becomes ``None``
    (``null``); a geometry with one raises :class:`GeoJSONError` naming the feature.
    """
    return _encode(annotations, container)[0]


def write_geojson(
    path: str | os.PathLike, annotations: Iterable[Annotation], as_collection: bool | None = None
) -> str:
    """Write annotations to ``path``.

    ``as_collection=True`` writes a FeatureCollection, ``False`` a bare feature list, ``None``
    (default) the container the annotations were read from (an :class:`AnnotationList`), else a
    FeatureCollection.
    """
    path = os.fspath(path)
    container = None if as_collection is None else (COLLECTION if as_collection else FEATURES)
    try:
        _, text, nulled = _encode(annotations, container)  # never a bare NaN: not JSON
    except GeoJSONError as exc:
        raise GeoJSONError(f"{path}: not written: {exc}") from None
    if nulled:
        warnings.warn(
            f"{path}: {len(nulled)} NaN or infinite value{'s' if len(nulled) > 1 else ''} "
            f"written as null (JSON has no NaN): {', '.join(nulled[:_LISTED])}"
            + (f", … ({len(nulled) - _LISTED} more)" if len(nulled) > _LISTED else ""),
            GeoJSONWarning,
            stacklevel=2,
        )
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
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
        # a NaN/inf measurement stays NaN here; write_geojson writes it as null, saying so
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
