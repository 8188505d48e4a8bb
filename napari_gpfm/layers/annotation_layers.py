"""Annotation and classifier layers: Shapes/Labels ⇄ annotations, class maps, probability maps.

napari here, never Qt. Geometry follows docs/ARCHITECTURE.md: a Shapes layer made here takes the
slide layer's scale ``(mpp, mpp)`` (so its data are level-0 pixel centres, as napari's own "new
shapes layer" button gives over a slide); layers with any other scale/translate (micrometres,
``scale = 1``) convert through :class:`~napari_gpfm.annotations.shapes.LayerFrame` too.

Shapes carry ``features["class"]`` (class name, "" = none), ``features["annotation"]``
(index of the imported QuPath object, -1 for shapes drawn in napari) and ``features["part"]``;
edge and face colours follow the class colour (:func:`apply_class_colours`). The imported
objects are kept in ``layer.metadata["napari_gpfm"]["templates"]`` so that export loses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..analyses.heatmap import Raster
from ..annotations.classes import ClassPalette
from ..annotations.geojson import Annotation
from ..annotations.labels import PatchLabels
from ..annotations.shapes import (
    LayerFrame,
    annotations_to_shapes,
    labels_from_mask,
    shapes_to_annotations,
)
from .reader import layer_slide

__all__ = [
    "FACE_ALPHA",
    "layer_frame",
    "slide_mpp",
    "is_annotation_layer",
    "annotation_layer_data",
    "annotations_from_layer",
    "apply_class_colours",
    "shape_colours",
    "paint_layer_data",
    "labels_from_paint_layer",
    "class_colormap",
    "class_map_layer_data",
    "probability_layer_data",
    "uncertainty_layer_data",
    "prediction_layer_data",
    "set_or_add_layer",
]

FACE_ALPHA = 0.25
META = "napari_gpfm"
_GREY = (128, 128, 128)


def slide_mpp(slide_layer: Any) -> float | None:
    """µm per level-0 pixel of a slide layer opened by napari-gpfm (None if unknown)."""
    slide = layer_slide(slide_layer)
    return None if slide is None else slide.mpp


def _units(mpp: float | None) -> tuple[str, str]:
    """napari units matching the slide layer's (µm with an mpp, else pixels)."""
    unit = "pixel" if mpp is None else "micrometer"
    return (unit, unit)


def layer_frame(layer: Any, mpp: float | None) -> LayerFrame:
    """The data → level-0 frame of any 2-D layer over a slide with ``mpp``."""
    scale = tuple(float(v) for v in np.asarray(layer.scale)[-2:])
    translate = tuple(float(v) for v in np.asarray(layer.translate)[-2:])
    return LayerFrame(scale, translate, mpp)  # type: ignore[arg-type]


def is_annotation_layer(layer: Any) -> bool:
    """A Shapes layer (ours or any other: shapes without a class are simply unclassified)."""
    return type(layer).__name__ == "Shapes"


# --- shapes ----------------------------------------------------------------------------------


def shape_colours(classes: Sequence[str], palette: ClassPalette) -> tuple[np.ndarray, np.ndarray]:
    """(edge, face) RGBA (n, 4) float for shapes of ``classes`` (unknown classes grey)."""
    known = {c.name: c.colour for c in palette}
    rgb = np.array([known.get(str(c), _GREY) for c in classes], dtype=np.float64).reshape(-1, 3)
    edge = np.hstack([rgb / 255.0, np.ones((len(rgb), 1))])
    face = edge.copy()
    face[:, 3] = FACE_ALPHA
    return edge, face


def annotation_layer_data(
    annotations: Sequence[Annotation],
    palette: ClassPalette,
    mpp: float | None,
    name: str = "annotations",
    slide_name: str | None = None,
) -> tuple:
    """Shapes LayerData for annotations (level-0 px) over a slide with ``mpp``."""
    frame = LayerFrame.for_slide(mpp)
    sd = annotations_to_shapes(annotations, frame)
    edge, face = shape_colours(sd.classes, palette)
    kwargs = {
        "name": name,
        "shape_type": sd.shape_type,
        "features": sd.features,
        "feature_defaults": {"class": palette.active or "", "annotation": -1, "part": 0},
        "edge_color": edge if len(sd.data) else "white",
        "face_color": face if len(sd.data) else "transparent",
        "edge_width": 2,
        "scale": frame.scale,
        "units": _units(mpp),
        "metadata": {META: {"kind": "annotations", "templates": sd.templates,
                            "slide_name": slide_name}},
    }
    if not sd.data:
        kwargs.pop("shape_type")
        kwargs["ndim"] = 2
        kwargs["features"] = {"class": np.array([], dtype=object),
                              "annotation": np.array([], dtype=np.int64),
                              "part": np.array([], dtype=np.int64)}
    return (list(sd.data), kwargs, "shapes")


def _feature_column(layer: Any, name: str, default: Any) -> list:
    feats = layer.features
    n = len(layer.data)
    if name in getattr(feats, "columns", ()):
        col = list(feats[name])
        return col if len(col) == n else col[:n] + [default] * (n - len(col))
    return [default] * n


def annotations_from_layer(
    layer: Any,
    mpp: float | None,
    palette: ClassPalette | None = None,
    notes: list[str] | None = None,
) -> list[Annotation]:
    """The layer's shapes as annotations in level-0 px (imported objects keep all their data)."""
    meta = layer.metadata.get(META, {}) if isinstance(layer.metadata, dict) else {}
    templates = meta.get("templates", []) if isinstance(meta, dict) else []
    classes = [None if c is None or (isinstance(c, float) and np.isnan(c)) else str(c)
               for c in _feature_column(layer, "class", "")]
    ids = [int(v) if v == v else -1 for v in _feature_column(layer, "annotation", -1)]
    colours = None if palette is None else {c.name: c.colour for c in palette}
    return shapes_to_annotations(
        layer.data, list(layer.shape_type), classes, layer_frame(layer, mpp),
        annotation=ids, templates=templates, colours=colours, notes=notes,
    )


def apply_class_colours(layer: Any, palette: ClassPalette) -> None:
    """Colour every shape by its class and make new shapes get the active class."""
    n = len(layer.data)
    if n:
        classes = [str(c) for c in _feature_column(layer, "class", "")]
        edge, face = shape_colours(classes, palette)
        if not np.array_equal(np.asarray(layer.edge_color), edge):
            layer.edge_color = edge
        if not np.array_equal(np.asarray(layer.face_color), face):
            layer.face_color = face
    defaults = {"class": palette.active or "", "annotation": -1, "part": 0}
    current = layer.feature_defaults
    if any(k not in current.columns or current[k].iloc[0] != v for k, v in defaults.items()):
        layer.feature_defaults = defaults


def set_class_of(layer: Any, indices: Sequence[int], class_name: str) -> None:
    """Give shapes ``indices`` the class ``class_name`` (emits the features event)."""
    feats = layer.features.copy()
    if "class" not in feats.columns:
        feats["class"] = ""
    feats["class"] = feats["class"].astype(object)
    idx = sorted(int(i) for i in indices)
    feats.loc[feats.index[idx], "class"] = class_name
    layer.features = feats


# --- painted labels ------------------------------------------------------------------------


def paint_layer_data(
    level0_size: tuple[int, int], mpp: float | None, palette: ClassPalette,
    cell: int = 16, name: str = "class paint",
) -> tuple:
    """An empty Labels layer for painting classes (value ``i + 1`` = palette class ``i``).

    One label pixel covers ``cell × cell`` level-0 pixels; its scale and translate put pixel
    ``(r, c)`` exactly over level-0 ``[c·cell, (c+1)·cell)``.
    """
    w, h = level0_size
    m = 1.0 if mpp is None else float(mpp)
    shape = (max(1, -(-int(h) // cell)), max(1, -(-int(w) // cell)))
    half = (cell / 2.0 - 0.5) * m
    kwargs = {
        "name": name,
        "scale": (cell * m, cell * m),
        "translate": (half, half),
        "units": _units(mpp),
        "colormap": class_colormap(palette.names, palette.colours()),
        "opacity": 0.5,
        "metadata": {META: {"kind": "class-paint", "classes": palette.names}},
    }
    return (np.zeros(shape, dtype=np.uint8), kwargs, "labels")


def labels_from_paint_layer(
    layer: Any, mpp: float | None, coords: np.ndarray, patch_size_level0: int,
    palette: ClassPalette, training_names: Sequence[str], min_fraction: float = 0.5,
) -> PatchLabels:
    """Patch labels (over ``training_names``) from a painted Labels layer."""
    names = palette.names
    raw = labels_from_mask(
        np.asarray(layer.data), layer_frame(layer, mpp), coords, patch_size_level0, names,
        min_fraction, excluded=[c.excluded for c in palette],
    )
    keep = [names.index(n) for n in training_names]
    lookup = np.full(len(names) + 1, -1, dtype=np.int64)
    for j, i in enumerate(keep):
        lookup[i] = j
    lab = lookup[np.where(raw.labels >= 0, raw.labels, len(names))]
    conflicts = raw.conflicts
    return PatchLabels(
        labels=lab, fractions=raw.fractions[:, keep], class_names=list(training_names),
        conflicts=conflicts, conflict_classes=raw.conflict_classes, ignored=raw.ignored,
        excluded_classes=raw.excluded_classes, skipped=[],
    )


# --- prediction layers -------------------------------------------------------------------------


def class_colormap(class_names: Sequence[str], colours: Any):
    """napari colormap painting label ``i + 1`` in class ``i``'s colour, 0 transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    rgb = np.asarray(colours, dtype=np.float64).reshape(-1, 3)
    if rgb.size and rgb.max() > 1.0:
        rgb = rgb / 255.0
    color_dict: dict = {None: np.zeros(4), 0: np.zeros(4)}
    for i in range(len(class_names)):
        color_dict[i + 1] = np.array([*rgb[i], 1.0])
    return DirectLabelColormap(color_dict=color_dict)


def class_map_layer_data(
    raster: Raster, class_names: Sequence[str], colours: Any, name: str, slide: str | None = None
) -> tuple:
    """Labels LayerData of a class map (class ``i`` = ``i + 1``) aligned with the slide."""
    from .convert import labels_layer_data

    if colours is None:
        colours = ClassPalette([(n, None) for n in class_names]).colours()
    rgb = np.asarray(colours, dtype=np.float64).reshape(-1, 3) / 255.0
    return labels_layer_data(raster, name, colours=rgb, opacity=0.6, slide=slide,
                             metadata={"kind": "class-map", "classes": list(class_names)})


def _ramp(colour: Any, name: str):
    from napari.utils.colormaps import Colormap

    rgb = np.asarray(colour, dtype=np.float64)[:3]
    if rgb.max() > 1.0:
        rgb = rgb / 255.0
    return Colormap([[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]], name=name)


def probability_layer_data(raster: Raster, class_name: str, colour: Any, name: str,
                           slide: str | None = None) -> tuple:
    """Image LayerData of one class's probability (0..1, NaN = no patch = transparent)."""
    from .convert import heatmap_layer_data

    cmap = _ramp(colour if colour is not None else _GREY, f"gpfm-p-{class_name}")
    data, kwargs, kind = heatmap_layer_data(
        raster, name, colormap=cmap, contrast_limits=(0.0, 1.0), opacity=0.7, slide=slide,
        metadata={"kind": "class-probability", "class": class_name})
    kwargs["visible"] = False
    return data, kwargs, kind


def uncertainty_layer_data(raster: Raster, name: str, slide: str | None = None) -> tuple:
    """Image LayerData of the normalised predictive entropy (0 certain … 1 uniform)."""
    from .convert import heatmap_layer_data

    data, kwargs, kind = heatmap_layer_data(
        raster, name, colormap="magma", contrast_limits=(0.0, 1.0), opacity=0.7, slide=slide,
        metadata={"kind": "uncertainty"})
    kwargs["visible"] = False
    return data, kwargs, kind


def prediction_layer_data(
    rasters: dict[str, Raster], class_names: Sequence[str], colours: Any, prefix: str
) -> list[tuple]:
    """Class map, one probability image per class and the uncertainty image, as LayerData."""
    rgb = None if colours is None else np.asarray(colours, dtype=np.float64).reshape(-1, 3)
    out = [class_map_layer_data(rasters["classes"], class_names, rgb, f"{prefix} classes",
                                prefix)]
    for i, n in enumerate(class_names):
        out.append(probability_layer_data(
            rasters[f"p:{n}"], n, None if rgb is None else rgb[i], f"{prefix} P({n})", prefix))
    out.append(uncertainty_layer_data(rasters["entropy"], f"{prefix} uncertainty", prefix))
    return out


def set_or_add_layer(viewer: Any, layer_data: tuple) -> Any:
    """Update the layer of that name in place, else add it (``convert.upsert_layer``)."""
    from .convert import upsert_layer

    return upsert_layer(viewer, layer_data)
