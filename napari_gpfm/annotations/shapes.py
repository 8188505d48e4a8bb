"""napari Shapes/Labels layer data ⇄ :class:`~napari_gpfm.annotations.geojson.Annotation`.

Numpy only (annotations never import napari); ``napari_gpfm.layers.annotation_layers`` applies
this to real layers.

Coordinates. Annotations are in QuPath's level-0 pixel-corner convention (pixel ``i`` spans
``[i, i+1)``). napari puts the centre of slide pixel ``k`` at world ``k·mpp``, so a level-0
vertex ``v`` lies at world ``(v − 0.5)·mpp`` (docs/ARCHITECTURE.md, "layers"). A layer maps its
data coordinates ``d`` (y, x) to world ``d·scale + translate``; :class:`LayerFrame` composes the
two, so a Shapes layer may hold level-0 pixels (``scale = (mpp, mpp)``, what napari gives a new
Shapes layer over a slide and what :meth:`LayerFrame.for_slide` builds), micrometres
(``scale = 1``) or anything else. Without an mpp the world unit is level-0 pixels (``mpp = 1``).

Shapes. One napari shape per polygon of an annotation: a polygon with holes is one napari
polygon whose vertex list is the closed exterior followed by each closed hole (napari
triangulates repeated closing vertices as holes); a MultiPolygon is several shapes sharing an
``annotation`` id. Rectangles and ellipses (as a 64-gon) become polygons; paths of 3 or more
vertices (freehand outlines) are closed as polygons; lines and 2-vertex paths are skipped and
reported. Each original annotation is kept as a *template* (id, object type, properties,
classification as it came, geometry members such as QuPath's ``plane``, exact coordinates,
and non-polygon geometries that have no shape), so QuPath → layer → QuPath loses nothing: a
ring whose vertices did not move (within 1e-6 level-0 px, or a few float32 ulps) is written
back with its original coordinates (napari keeps vertices as float32). An edited outline loses
QuPath's ``isEllipse`` (QuPath would redraw it as the ellipse in its bounding box).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .geojson import Annotation
from .labels import PatchLabels, labels_from_fractions

__all__ = [
    "LayerFrame",
    "ShapesData",
    "annotations_to_shapes",
    "shapes_to_annotations",
    "pack_rings",
    "split_rings",
    "ellipse_ring",
    "labels_from_mask",
]

ELLIPSE_VERTICES = 64
# A ring this close to its template keeps the template's numbers: napari stores vertices as
# float32 (about 7 significant digits), so "unmoved" means within a few float32 ulps.
_SAME_RTOL = 1e-6
_SAME_ATOL = 1e-4  # level-0 px


@dataclass(frozen=True)
class LayerFrame:
    """Map between a layer's data coordinates (y, x) and level-0 pixel-corner (x, y).

    ``scale``/``translate`` are the layer's (y, x) for its last two axes; ``mpp`` the slide's
    µm per level-0 pixel (None: world unit is level-0 px).
    """

    scale: tuple[float, float] = (1.0, 1.0)
    translate: tuple[float, float] = (0.0, 0.0)
    mpp: float | None = None

    @classmethod
    def for_slide(cls, mpp: float | None) -> LayerFrame:
        """The frame of a layer drawn over a slide layer: data = level-0 pixel centres."""
        m = 1.0 if mpp is None else float(mpp)
        return cls((m, m), (0.0, 0.0), mpp)

    @property
    def _m(self) -> float:
        return 1.0 if self.mpp is None else float(self.mpp)

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """level-0 pixel-centre coordinate u (y, x) = data·a + b (per axis)."""
        m = self._m
        a = np.asarray(self.scale, np.float64) / m
        b = np.asarray(self.translate, np.float64) / m
        return a, b

    def data_to_level0(self, yx: np.ndarray) -> np.ndarray:
        """(n, 2) layer data (y, x) → (n, 2) level-0 pixel-corner (x, y)."""
        d = np.asarray(yx, dtype=np.float64)[:, -2:]
        a, b = self._affine()
        u = d * a + b if (np.any(a != 1) or np.any(b != 0)) else d
        return (u + 0.5)[:, ::-1]

    def level0_to_data(self, xy: np.ndarray) -> np.ndarray:
        """(n, 2) level-0 pixel-corner (x, y) → (n, 2) layer data (y, x)."""
        u = np.asarray(xy, dtype=np.float64)[:, ::-1] - 0.5
        a, b = self._affine()
        return (u - b) / a if (np.any(a != 1) or np.any(b != 0)) else u


@dataclass
class ShapesData:
    """What a napari Shapes layer needs, as plain arrays and lists.

    ``data`` (y, x) vertex arrays, ``shape_type`` per shape, ``classes`` ("" = unclassified),
    ``annotation`` (index into ``templates``; -1 for a shape drawn in napari) and ``part``
    (polygon index within the annotation). ``templates`` are the imported annotations.
    """

    data: list[np.ndarray] = field(default_factory=list)
    shape_type: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    annotation: list[int] = field(default_factory=list)
    part: list[int] = field(default_factory=list)
    templates: list[Annotation] = field(default_factory=list)

    @property
    def features(self) -> dict[str, np.ndarray]:
        return {
            "class": np.asarray(self.classes, dtype=object),
            "annotation": np.asarray(self.annotation, dtype=np.int64),
            "part": np.asarray(self.part, dtype=np.int64),
        }


# --- ring packing ----------------------------------------------------------------------------


def pack_rings(rings: Sequence[np.ndarray]) -> np.ndarray:
    """One napari polygon from ``[exterior, holes...]`` (closed rings, any coordinates).

    Without holes the closing vertex is dropped (napari closes polygons itself); with holes every
    ring stays closed and they are concatenated, which napari draws as a polygon with holes.
    """
    rings = [np.asarray(r, dtype=np.float64) for r in rings]
    if len(rings) == 1:
        r = rings[0]
        return r[:-1] if len(r) > 1 and np.array_equal(r[0], r[-1]) else r
    closed = [r if np.array_equal(r[0], r[-1]) else np.vstack([r, r[:1]]) for r in rings]
    return np.vstack(closed)


def split_rings(vertices: np.ndarray) -> list[np.ndarray]:
    """Inverse of :func:`pack_rings`: closed rings from a napari polygon's vertex list.

    A ring ends where its first vertex comes back; vertices after that start the next ring (a
    hole). A vertex list with no repeat is one ring, closed here.
    """
    v = np.asarray(vertices, dtype=np.float64)
    rings, i, n = [], 0, len(v)
    while i < n:
        same = np.nonzero(np.all(v[i + 1 :] == v[i], axis=1))[0]
        j = n - 1 if same.size == 0 else i + 1 + int(same[0])
        ring = v[i : j + 1]
        if not np.array_equal(ring[0], ring[-1]):
            ring = np.vstack([ring, ring[:1]])
        if len(ring) >= 4:  # at least a triangle plus its closing vertex
            rings.append(ring)
        i = j + 1
    return rings


def ellipse_ring(corners: np.ndarray, n: int = ELLIPSE_VERTICES) -> np.ndarray:
    """Closed n-gon of the ellipse inscribed in napari's 4 bounding-box corners (any frame)."""
    c = np.asarray(corners, dtype=np.float64)
    centre = c.mean(axis=0)
    a = (c[1] - c[0]) / 2  # half-axis along the first box edge
    b = (c[3] - c[0]) / 2  # half-axis along the second box edge
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = centre + np.cos(t)[:, None] * a + np.sin(t)[:, None] * b
    return np.vstack([ring, ring[:1]])


# --- annotations → shapes ------------------------------------------------------------------


def annotations_to_shapes(annotations: Sequence[Annotation], frame: LayerFrame) -> ShapesData:
    """Shapes (in ``frame``'s data coordinates) for annotations; every annotation is a template.

    Annotations without polygons (points, lines) get no shape but stay as templates.
    """
    out = ShapesData(templates=list(annotations))
    for k, a in enumerate(out.templates):
        for p, poly in enumerate(a.polygons):
            rings = [frame.level0_to_data(r) for r in poly]
            out.data.append(pack_rings(rings))
            out.shape_type.append("polygon")
            out.classes.append(a.class_name or "")
            out.annotation.append(k)
            out.part.append(p)
    return out


# --- shapes → annotations ------------------------------------------------------------------


def _shape_rings(
    data: np.ndarray, shape_type: str, frame: LayerFrame
) -> list[np.ndarray] | None:
    """Level-0 closed rings of one shape, or None for shapes without an area."""
    d = np.asarray(data, dtype=np.float64)[:, -2:]
    if shape_type == "ellipse":
        rings = [ellipse_ring(d)]
    elif shape_type in ("polygon", "rectangle", "path"):
        rings = split_rings(d)
    else:  # line
        return None
    if not rings:
        return None
    return [frame.data_to_level0(r) for r in rings]


def _keep_template_numbers(rings: list[np.ndarray], template: list | None) -> list[np.ndarray]:
    if template is None or len(template) != len(rings):
        return rings
    if all(t.shape == r.shape and np.allclose(t, r, rtol=_SAME_RTOL, atol=_SAME_ATOL)
           for t, r in zip(template, rings)):
        return [np.array(t, copy=True) for t in template]
    return rings


def shapes_to_annotations(
    data: Sequence[np.ndarray],
    shape_type: Sequence[str],
    classes: Sequence[str | None],
    frame: LayerFrame,
    annotation: Sequence[int] | None = None,
    templates: Sequence[Annotation] = (),
    colours: dict[str, tuple[int, int, int]] | None = None,
    notes: list[str] | None = None,
) -> list[Annotation]:
    """Annotations (level-0 px) from Shapes layer data.

    Shapes sharing an ``annotation`` id ≥ 0 form one annotation, which keeps everything of its
    template but the geometry and class (a moved ring gets the new coordinates; a class changed
    in napari wins). Shapes with id -1 (drawn in napari) are one annotation each. ``colours``
    maps class names to RGB (the palette); a class missing there keeps its template colour.
    Templates without polygons (points, lines) are passed through. Shapes without an area are
    skipped and counted in ``notes``.
    """
    n = len(data)
    ids = [-1] * n if annotation is None else [int(i) for i in annotation]
    groups: dict[object, list[int]] = {}
    order: list[object] = []
    for i in range(n):
        key: object = ids[i] if 0 <= ids[i] < len(templates) else ("new", i)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(i)
    for k, t in enumerate(templates):
        if not t.polygons and k not in groups:
            groups[k] = []
            order.append(k)
    # templates first, in file order, then shapes drawn in napari in layer order
    order.sort(key=lambda key: (0, key, 0) if isinstance(key, int) else (1, 0, key[1]))
    skipped = 0
    out: list[Annotation] = []
    for key in order:
        members = groups[key]
        template = templates[key] if isinstance(key, int) else None
        if template is not None and not template.polygons:
            out.append(dataclasses.replace(template))
            continue
        polygons = []
        for i in members:
            rings = _shape_rings(data[i], shape_type[i], frame)
            if rings is None:
                skipped += 1
                continue
            tpl_poly = None
            if template is not None:
                # a shape's polygon index is its position among the template's parts when the
                # count is unchanged; matching by geometry keeps moved shapes correct too
                tpl_poly = _match_polygon(rings, template.polygons)
            polygons.append(_keep_template_numbers(rings, tpl_poly))
        if not polygons:
            continue
        cls_raw = classes[members[0]]
        cls = str(cls_raw) if cls_raw not in (None, "") and cls_raw == cls_raw else None
        colour = None
        if cls is not None and colours and cls in colours:
            colour = tuple(int(c) for c in colours[cls])
        elif template is not None and template.class_name == cls:
            colour = template.color
        gtype = "Polygon" if len(polygons) == 1 else "MultiPolygon"
        if template is not None:
            if template.geometry_type == "MultiPolygon":
                gtype = "MultiPolygon"  # a one-part MultiPolygon stays one
            geometry_extra = dict(template.geometry_extra)
            if not _same_polygons(polygons, template.polygons):
                # QuPath would rebuild an edited outline as the ellipse in its bounding box
                geometry_extra.pop("isEllipse", None)
            out.append(dataclasses.replace(
                template, polygons=polygons, geometry_type=gtype, class_name=cls, color=colour,
                properties=dict(template.properties), geometry_extra=geometry_extra,
            ))
        else:
            out.append(Annotation(polygons, gtype, cls, colour, "annotation"))
    if skipped and notes is not None:
        notes.append(f"{skipped} shape(s) without an area (lines) were left out")
    return out


def _same_polygons(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        len(p) == len(q) and all(np.array_equal(r, t) for r, t in zip(p, q)) for p, q in zip(a, b)
    )


def _match_polygon(rings: list[np.ndarray], polygons: list) -> list | None:
    for poly in polygons:
        if len(poly) == len(rings) and all(
            t.shape == r.shape and np.allclose(t, r, rtol=_SAME_RTOL, atol=_SAME_ATOL)
            for t, r in zip(poly, rings)
        ):
            return poly
    return None


# --- painted labels → patch labels -------------------------------------------------------


def labels_from_mask(
    mask: np.ndarray,
    frame: LayerFrame,
    coords: np.ndarray,
    patch_size_level0: int,
    class_names: Sequence[str],
    min_fraction: float = 0.5,
    excluded: Sequence[bool] | None = None,
) -> PatchLabels:
    """Patch labels from a painted Labels layer (value ``i + 1`` = class ``i``, 0 = none).

    Each patch footprint (level-0 ``[x, x+P)``) is mapped into the mask's pixels (those whose
    centre lies inside the footprint); the patch gets class ``i`` when pixels of value ``i + 1``
    are at least ``min_fraction`` of the footprint. ``excluded[i]`` marks ``Ignore*`` classes:
    those patches are flagged ``ignored`` and stay unlabelled. Counted exactly with one
    summed-area table per painted value.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a painted labels layer must be 2-D, got shape {m.shape}")
    c = np.asarray(coords, dtype=np.float64)
    n, names = c.shape[0], list(class_names)
    P = float(patch_size_level0)
    excl = np.zeros(len(names), bool) if excluded is None else np.asarray(excluded, bool)
    # footprint corners in mask data coordinates (y, x): pixels j with a ≤ j < b are inside
    lo = frame.level0_to_data(c)  # level-0 corner (x, y) -> data (y, x)
    hi = frame.level0_to_data(c + P)
    a = np.ceil(np.minimum(lo, hi) - 1e-9).astype(np.int64)
    b = np.ceil(np.maximum(lo, hi) - 1e-9).astype(np.int64)
    H, W = m.shape
    y0, x0 = np.clip(a[:, 0], 0, H), np.clip(a[:, 1], 0, W)
    y1, x1 = np.clip(b[:, 0], 0, H), np.clip(b[:, 1], 0, W)
    area = np.maximum((b[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]), 1).astype(np.float64)
    fractions = np.zeros((n, len(names)))
    ignore_frac = np.zeros(n)
    for value in np.unique(m[m > 0]).tolist():
        i = int(value) - 1
        if i >= len(names):
            continue
        sat = np.zeros((H + 1, W + 1), dtype=np.int64)
        np.cumsum(np.cumsum(m == value, axis=0, dtype=np.int64), axis=1, out=sat[1:, 1:])
        count = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
        frac = count / area
        if excl[i]:
            ignore_frac += frac
        else:
            fractions[:, i] = frac
    return labels_from_fractions(
        fractions, names, ignore_frac, min_fraction,
        excluded_classes=[nm for nm, e in zip(names, excl) if e], trainable=~excl,
    )
