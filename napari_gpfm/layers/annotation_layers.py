"""Annotation and classifier layers: Shapes/Labels ⇄ annotations, class maps, probability maps.

napari here, never Qt. Geometry follows docs/ARCHITECTURE.md: a Shapes layer made here takes the
slide layer's scale ``(mpp, mpp)`` (so its data are level-0 pixel centres, as napari's own "new
shapes layer" button gives over a slide); layers with any other scale/translate (micrometres,
``scale = 1``) convert through :class:`~napari_gpfm.annotations.shapes.LayerFrame` too.

Shapes carry ``features["class"]`` (class name, "" = none), ``features["annotation"]``
(index of the imported QuPath object, -1 for shapes drawn in napari) and ``features["part"]``;
edge and face colours follow the class colour (:func:`apply_class_colours`, which first adds
those columns to any Shapes layer that lacks them: :func:`ensure_class_features`). A shape added
to a layer watched by :func:`attach_active_class` gets the class active at that moment. The
imported objects are kept in ``layer.metadata["napari_gpfm"]["templates"]`` so that export loses
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    "relative_to_slide",
    "layer_frame",
    "slide_mpp",
    "is_annotation_layer",
    "annotation_layer_data",
    "annotations_from_layer",
    "ensure_class_features",
    "apply_class_colours",
    "attach_active_class",
    "shape_colours",
    "paint_layer_data",
    "labels_from_paint_layer",
    "class_colormap",
    "class_map_layer_data",
    "probability_layer_data",
    "uncertainty_layer_data",
    "prediction_layer_data",
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


#: The feature columns every annotation Shapes layer carries: name -> (default, dtype).
CLASS_FEATURES: dict[str, tuple[Any, str]] = {
    "class": ("", "object"),
    "annotation": (-1, "int64"),
    "part": (0, "int64"),
}


def _class_column(col: Any) -> Any:
    """``col`` as object strings, missing values -> "" (for a foreign, odd-typed column)."""
    import pandas as pd

    vals = [("" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)) for v in col]
    return pd.Series(vals, index=col.index, dtype=object)


def _int_column(col: Any, default: int) -> Any:
    """``col`` as int64 (missing or non-numeric -> ``default``, fractions rounded)."""
    import pandas as pd

    vals = np.asarray(pd.to_numeric(col, errors="coerce"), dtype=np.float64)
    vals = np.where(np.isfinite(vals), np.round(vals), default)
    return pd.Series(vals.astype(np.int64), index=col.index)


def _column_ok(col: Any, dtype: str) -> bool:
    import pandas as pd

    if dtype == "object":
        stringy = col.dtype == object or pd.api.types.is_string_dtype(col.dtype)
        return (stringy and not isinstance(col.dtype, pd.CategoricalDtype)
                and not bool(col.isna().any()))
    return pd.api.types.is_integer_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype)


def ensure_class_features(layer: Any) -> bool:
    """Give a Shapes layer the ``class``/``annotation``/``part`` feature columns.

    Missing columns are added (empty for an empty layer, else filled with "" / -1 / 0), columns
    of an unusable dtype (categorical, mixed objects) are coerced; other columns are kept.
    Works on any Shapes layer (ours, napari's own "new shapes layer", one from GeoJSON, one
    with unrelated features). Returns True when the features table was changed.
    """
    import pandas as pd

    feats = layer.features
    n = len(layer.data)
    if len(feats) != n:  # never expected from napari; start from a table of the right length
        feats = pd.DataFrame(index=range(n))
    df = None
    for name, (default, dtype) in CLASS_FEATURES.items():
        if name in feats.columns and _column_ok(feats[name], dtype):
            continue
        if df is None:
            df = feats.copy()
        if name not in df.columns:
            df[name] = pd.Series([default] * n, index=df.index, dtype=dtype)
        elif dtype == "object":
            df[name] = _class_column(df[name])
        else:
            df[name] = _int_column(df[name], default)
    if df is None:
        return False
    layer.features = df
    return True


def _same_value(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # pd.NA, arrays
        return False


def _set_feature_defaults(layer: Any, values: dict[str, Any]) -> None:
    """Set some feature defaults (others kept); the columns must exist."""
    current = layer.feature_defaults
    if all(k in current.columns and _same_value(current[k].iloc[0], v) for k, v in values.items()):
        return
    merged = {}
    for c in layer.features.columns:
        if c in values:
            merged[c] = values[c]
        elif c in current.columns:
            merged[c] = current[c].iloc[0]
        else:
            merged[c] = None
    layer.feature_defaults = merged


def apply_class_colours(layer: Any, palette: ClassPalette) -> None:
    """Colour every shape by its class and make new shapes get the active class.

    Works on any Shapes layer: the class feature columns are added first when missing
    (:func:`ensure_class_features`), so napari's own empty "new shapes layer" is fine too.
    """
    ensure_class_features(layer)
    n = len(layer.data)
    if n:
        classes = [str(c) for c in _feature_column(layer, "class", "")]
        edge, face = shape_colours(classes, palette)
        if not np.array_equal(np.asarray(layer.edge_color), edge):
            layer.edge_color = edge
        if not np.array_equal(np.asarray(layer.face_color), face):
            layer.face_color = face
    _set_feature_defaults(layer, {"class": palette.active or "", "annotation": -1, "part": 0})


def attach_active_class(
    layer: Any,
    active: Callable[[], str | None],
    palette: ClassPalette | Callable[[], ClassPalette | None] | None = None,
) -> Callable[[], None]:
    """Give every shape added to ``layer`` from now on the class ``active()`` has then.

    ``active`` is called when a shape is added (drawn with the mouse in any ``add_*`` mode,
    ``layer.add*``, ``layer.data = ...`` on an empty layer, pasted); ``None`` means
    unclassified (""). The new shapes also get ``annotation = -1`` and ``part = 0`` (new
    objects, even when pasted from an imported one) and, with a ``palette`` (a
    :class:`ClassPalette` or a callable returning one), the class colour. Shapes that already
    exist keep their class. Returns a function that disconnects all this.

    napari emits ``events.data`` with ``action`` ADDING before the shape exists and ADDED once
    it is complete (on mouse release for drawn shapes), both with ``data_indices=(-1,)``; so
    the number of shapes at ADDING marks where the new ones start. Paste emits no data event,
    only ``events.features``; the shape count tells it apart.
    """
    from napari.layers.base._base_constants import ActionType

    state: dict[str, Any] = {"known": len(layer.data), "start": None, "busy": False}

    def _palette() -> ClassPalette | None:
        return palette() if callable(palette) and not isinstance(palette, ClassPalette) else palette

    def _active() -> str:
        name = active()
        return "" if name is None else str(name)

    def _colours(name: str):
        pal = _palette()
        if pal is None:
            return None
        edge, face = shape_colours([name], pal)
        return edge[0], face[0]

    def _prepare() -> None:
        """Before a shape is added: new rows and the shape being drawn get the class now."""
        name = _active()
        state["busy"] = True
        try:
            ensure_class_features(layer)
            _set_feature_defaults(layer, {"class": name, "annotation": -1, "part": 0})
            colours = _colours(name)
            if colours is not None:
                with layer.block_update_properties():
                    layer.current_edge_color = colours[0]
                    layer.current_face_color = colours[1]
        finally:
            state["busy"] = False

    def _assign(start: int) -> None:
        n = len(layer.data)
        state["known"] = n
        if start >= n:
            return
        name = _active()
        state["busy"] = True
        try:
            ensure_class_features(layer)
            feats = layer.features.copy()
            new = feats.index[start:]
            feats.loc[new, "class"] = name
            feats.loc[new, "annotation"] = -1
            feats.loc[new, "part"] = 0
            layer.features = feats
            _set_feature_defaults(layer, {"class": name, "annotation": -1, "part": 0})
            colours = _colours(name)
            if colours is not None:
                edge = np.array(layer.edge_color, dtype=np.float64)
                face = np.array(layer.face_color, dtype=np.float64)
                if len(edge) == n and len(face) == n:
                    edge[start:] = colours[0]
                    face[start:] = colours[1]
                    layer.edge_color = edge
                    layer.face_color = face
        finally:
            state["busy"] = False
            state["known"] = len(layer.data)

    def on_data(event: Any) -> None:
        if state["busy"]:
            return
        action = getattr(event, "action", None)
        if action == ActionType.ADDING:
            state["start"] = len(layer.data)
            _prepare()
        elif action == ActionType.ADDED:
            start = state["start"] if state["start"] is not None else state["known"]
            state["start"] = None
            _assign(start)
        elif action in (ActionType.REMOVED, ActionType.CHANGED):
            state["known"] = len(layer.data)

    def on_features(event: Any = None) -> None:
        if state["busy"] or state["start"] is not None:  # ours, or a shape being drawn
            return
        if len(layer.data) > state["known"]:  # pasted
            _assign(state["known"])
        else:
            state["known"] = len(layer.data)

    layer.events.data.connect(on_data)
    layer.events.features.connect(on_features)

    def detach() -> None:
        layer.events.data.disconnect(on_data)
        layer.events.features.disconnect(on_features)

    return detach


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
    raster: Raster, class_names: Sequence[str], colours: Any, name: str, slide: str | None = None,
    *, offset: Sequence[float] = (0.0, 0.0),
) -> tuple:
    """Labels LayerData of a class map (class ``i`` = ``i + 1``) aligned with the slide.

    ``offset`` (y, x) is the slide layer's ``translate[-2:]`` in world units, as in
    :func:`~napari_gpfm.layers.convert.labels_layer_data`.
    """
    from .convert import labels_layer_data

    if colours is None:
        colours = ClassPalette([(n, None) for n in class_names]).colours()
    rgb = np.asarray(colours, dtype=np.float64).reshape(-1, 3) / 255.0
    return labels_layer_data(raster, name, colours=rgb, opacity=0.6, offset=offset, slide=slide,
                             metadata={"kind": "class-map", "classes": list(class_names)})


def _ramp(colour: Any, name: str):
    from napari.utils.colormaps import Colormap

    rgb = np.asarray(colour, dtype=np.float64)[:3]
    if rgb.max() > 1.0:
        rgb = rgb / 255.0
    return Colormap([[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]], name=name)


def probability_layer_data(raster: Raster, class_name: str, colour: Any, name: str,
                           slide: str | None = None, *,
                           offset: Sequence[float] = (0.0, 0.0)) -> tuple:
    """Image LayerData of one class's probability (0..1, NaN = no patch = transparent).

    Added hidden (``visible=False``); ``offset`` as in :func:`class_map_layer_data`.
    """
    from .convert import heatmap_layer_data

    cmap = _ramp(colour if colour is not None else _GREY, f"gpfm-p-{class_name}")
    data, kwargs, kind = heatmap_layer_data(
        raster, name, colormap=cmap, contrast_limits=(0.0, 1.0), opacity=0.7, offset=offset,
        slide=slide, metadata={"kind": "class-probability", "class": class_name})
    kwargs["visible"] = False
    return data, kwargs, kind


def uncertainty_layer_data(raster: Raster, name: str, slide: str | None = None, *,
                           offset: Sequence[float] = (0.0, 0.0)) -> tuple:
    """Image LayerData of the normalised predictive entropy (0 certain … 1 uniform).

    Added hidden (``visible=False``); ``offset`` as in :func:`class_map_layer_data`.
    """
    from .convert import heatmap_layer_data

    data, kwargs, kind = heatmap_layer_data(
        raster, name, colormap="magma", contrast_limits=(0.0, 1.0), opacity=0.7, offset=offset,
        slide=slide, metadata={"kind": "uncertainty"})
    kwargs["visible"] = False
    return data, kwargs, kind


def prediction_layer_data(
    rasters: dict[str, Raster], class_names: Sequence[str], colours: Any, prefix: str,
    *, offset: Sequence[float] = (0.0, 0.0),
) -> list[tuple]:
    """Class map, one probability image per class and the uncertainty image, as LayerData.

    ``offset`` (y, x): the slide layer's ``translate[-2:]`` (world units), so the maps of a
    slide placed elsewhere in the world lie over that slide.
    """
    rgb = None if colours is None else np.asarray(colours, dtype=np.float64).reshape(-1, 3)
    off = tuple(float(v) for v in offset)
    out = [class_map_layer_data(rasters["classes"], class_names, rgb, f"{prefix} classes",
                                prefix, offset=off)]
    for i, n in enumerate(class_names):
        out.append(probability_layer_data(
            rasters[f"p:{n}"], n, None if rgb is None else rgb[i], f"{prefix} P({n})", prefix,
            offset=off))
    out.append(uncertainty_layer_data(rasters["entropy"], f"{prefix} uncertainty", prefix,
                                      offset=off))
    return out


class _Shifted:
    """A layer seen with another ``translate`` (every other attribute is the layer's)."""

    def __init__(self, layer: Any, translate: np.ndarray):
        self._layer = layer
        self.translate = translate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)


def relative_to_slide(layer: Any, offset: tuple[float, float]) -> Any:
    """``layer`` as the annotation readers expect it: placed relative to its slide layer.

    The readers (:func:`annotations_from_layer`, ``labels_from_paint_layer``) take world
    ``(0, 0)`` as the slide's level-0 origin; a slide layer moved to ``offset`` (its
    ``translate``, world y x) is taken into account by subtracting it from the layer's own
    ``translate``."""
    off = np.asarray(offset, dtype=float)
    if not np.any(off):
        return layer
    t = np.array(layer.translate, dtype=float)
    t[-2:] -= off
    return _Shifted(layer, t)
