"""Analysis results -> napari LayerData tuples ``(data, kwargs, layer_type)``; no Qt here.

Every raster layer is placed with the exact geometry of :mod:`napari_gpfm.analyses.heatmap`
(``docs/ARCHITECTURE.md``, "layers"): a cell of one grid stride ``s`` whose first cell starts at
level-0 ``x0`` gets ``scale = s·mpp`` and ``translate = (x0 + s/2 − 0.5)·mpp``, so a patch's cells
cover exactly its level-0 footprint ``[(x − 0.5)·mpp, (x + P − 0.5)·mpp)`` in world µm.
``offset`` (y, x) adds the slide layer's own ``translate`` when it has one.

Heatmaps are float32 images with NaN off the patch grid; napari draws NaN with the colormap's
``nan_color`` (transparent by default), so non-tissue stays see-through. Cluster maps are Labels
layers whose colours come from :data:`CLUSTER_COLOURS`, the palette the embedding plot and
the GeoJSON export use too.

Legends: every heatmap carries ``metadata["napari_gpfm"]["legend"] = "colorbar"`` and
:func:`upsert_layer` (the one way result layers reach the viewer) turns on napari's colour-bar
overlay for it (``layer.colorbar``: the colormap with the contrast limits as its value range);
cluster and class maps name their labels in ``layer.features`` (:func:`cluster_legend`).
The colour bar of a newly added layer is turned on one turn of the event loop later when a
deferrer is set (:func:`set_deferrer`; the Qt docks set one): napari builds the bar's visual
(a texture) when it is first shown, and doing that in the tick that also added the layer made
one stall of both.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..analyses.heatmap import PatchGrid, Raster, labels_raster

__all__ = [
    "CLUSTER_COLOURS",
    "MICROMETRE",
    "PIXEL",
    "LayerData",
    "apply_legend",
    "camera_for_patch",
    "cluster_colours",
    "cluster_legend",
    "contrast_limits_for",
    "heatmap_layer_data",
    "labels_layer_data",
    "legible_limits",
    "mask_layer_data",
    "patch_boxes_world",
    "patch_centre_world",
    "patch_grid_layer_data",
    "set_deferrer",
    "show_colorbar",
    "tissue_layer_data",
    "top_hits_layer_data",
    "upsert_layer",
]

LayerData = tuple  # (data, kwargs, layer_type)
MICROMETRE = "micrometer"
PIXEL = "pixel"
META_KEY = "napari_gpfm"
#: metadata key (under ``napari_gpfm``) of layers that carry a legend: ``"colorbar"``
LEGEND_KEY = "legend"

#: Cluster colours (RGB 0-1): Tableau 10 then its light variants (tab20 order), then repeats.
_TAB20 = (
    "1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22",
    "17becf", "aec7e8", "ffbb78", "98df8a", "ff9896", "c5b0d5", "c49c94", "f7b6d2", "c7c7c7",
    "dbdb8d", "9edae5",
)  # fmt: skip
CLUSTER_COLOURS = np.array([[int(h[i : i + 2], 16) / 255 for i in (0, 2, 4)] for h in _TAB20])


def cluster_colours(k: int) -> np.ndarray:
    """(k, 4) RGBA float colours of clusters 0..k-1 (the palette cycles after 20)."""
    rgb = CLUSTER_COLOURS[np.arange(k) % len(CLUSTER_COLOURS)]
    return np.hstack([rgb, np.ones((k, 1))])


def cluster_legend(k: int) -> list[tuple[str, np.ndarray]]:
    """(name, RGBA) of clusters 0..k-1: the names of the cluster Labels layer's ``features``
    and the colours it paints them in."""
    return [(f"Cluster {i}", c) for i, c in enumerate(cluster_colours(k))]


def _units(grid: PatchGrid) -> tuple[str, str]:
    unit = MICROMETRE if grid.mpp is not None else PIXEL
    return (unit, unit)


def _placement(grid: PatchGrid, offset: Sequence[float]) -> dict[str, Any]:
    oy, ox = (float(v) for v in offset)
    ty, tx = grid.translate
    return {"scale": grid.scale, "translate": (ty + oy, tx + ox), "units": _units(grid)}


def _meta(kind: str, slide: str | None, extra: dict | None) -> dict:
    # "slide_layer", not "slide": the reader keeps the live Slide under "slide", and
    # layer_slide() must not mistake a result layer for a slide layer
    meta = {"kind": kind, "slide_layer": slide}
    meta.update(extra or {})
    return {META_KEY: meta}


def contrast_limits_for(data: np.ndarray) -> tuple[float, float]:
    """Finite min/max of ``data`` (NaN ignored), widened when flat so napari accepts them."""
    finite = np.asarray(data)[np.isfinite(data)]
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return (lo, hi)


#: a colour bar needs this many float32 steps between its limits (napari's minimum shades count;
#: below it napari draws the range rescaled, and its colour bar then reads "0 … 1000")
_MIN_STEPS = 512


def legible_limits(limits: Sequence[float]) -> tuple[float, float]:
    """``limits`` widened (about their middle) just enough for float32 to hold a colour ramp
    between them, so the colour bar shows the true values; wider limits are returned as is."""
    lo, hi = (float(v) for v in limits)
    need = _MIN_STEPS * float(np.spacing(np.float32(max(abs(lo), abs(hi), 1e-30))))
    if hi - lo >= need:
        return (lo, hi)
    mid = 0.5 * (lo + hi)
    return (mid - need / 2, mid + need / 2)


def heatmap_layer_data(
    raster: Raster,
    name: str,
    *,
    colormap: str = "viridis",
    contrast_limits: tuple[float, float] | None = None,
    opacity: float = 0.6,
    offset: Sequence[float] = (0.0, 0.0),
    slide: str | None = None,
    metadata: dict | None = None,
) -> LayerData:
    """A float heatmap as an Image layer: NaN transparent, nearest-neighbour cells."""
    data = np.asarray(raster.data, dtype=np.float32)
    kwargs = {
        "name": name,
        "colormap": colormap,
        "contrast_limits": legible_limits(contrast_limits or contrast_limits_for(data)),
        "opacity": float(opacity),
        "blending": "translucent",
        "interpolation2d": "nearest",
        "metadata": _meta("heatmap", slide, {**(metadata or {}), LEGEND_KEY: "colorbar"}),
        **_placement(raster.grid, offset),
    }
    return (data, kwargs, "image")


def show_colorbar(layer: Any, visible: bool = True) -> None:
    """Show napari's colour bar of an Image layer (its colormap with the contrast limits as the
    value range, drawn on the canvas while the layer is visible; several are stacked)."""
    bar = getattr(layer, "colorbar", None)  # napari >= 0.5.5: a layer overlay
    if bar is None:
        return
    if bar.visible != visible:
        bar.visible = visible
    if visible and not bar.box:
        bar.box = True  # readable over bright tissue
        bar.font_size = 11


_WAITING: "weakref.WeakSet[Any]" = weakref.WeakSet()  # hidden layers waiting to be shown


def apply_legend(layer: Any) -> None:
    """Give a result layer the legend its metadata asks for (heatmaps: the colour bar).

    A hidden layer (probability and uncertainty maps are added hidden) gets its colour bar when
    the user shows it: napari draws a colour bar only while its layer is visible, and building
    the bar's visual for each hidden map made every classifier painting stall."""
    meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    if not (isinstance(meta, dict) and meta.get(LEGEND_KEY) == "colorbar"):
        return
    if layer.visible:
        show_colorbar(layer)
        return
    if layer in _WAITING:
        return
    _WAITING.add(layer)
    ref = weakref.ref(layer)

    def shown(event: Any = None) -> None:
        la = ref()
        if la is None or not la.visible:
            return
        la.events.visible.disconnect(shown)
        _WAITING.discard(la)
        show_colorbar(la)

    layer.events.visible.connect(shown)


#: ``fn -> None`` running ``fn`` in a later turn of the event loop (``None``: at once)
_DEFER: list[Any] = [None]


def set_deferrer(defer: Any) -> None:
    """How to run work in a later turn of the GUI event loop (``defer(fn)``); ``None``: at
    once (headless). The Qt side sets ``QTimer.singleShot(0, fn)``."""
    _DEFER[0] = defer


def _later(fn: Any) -> None:
    defer = _DEFER[0]
    if defer is None:
        fn()
    else:
        defer(fn)


def _legend_later(layer: Any, viewer: Any) -> None:
    """:func:`apply_legend` in a later tick, if the layer is still in the viewer then."""

    def run() -> None:
        try:
            if layer in viewer.layers:
                apply_legend(layer)
        except RuntimeError:  # the window closed meanwhile
            pass

    _later(run)


def _label_colormap(colours: np.ndarray, shift: int = 1) -> dict:
    cmap: dict = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for i, c in enumerate(np.asarray(colours, dtype=float)):
        rgba = tuple(c.tolist()) + ((1.0,) if len(c) == 3 else ())
        cmap[i + shift] = rgba
    return cmap


def labels_layer_data(
    raster: Raster,
    name: str,
    *,
    colours: np.ndarray | None = None,
    opacity: float = 0.5,
    offset: Sequence[float] = (0.0, 0.0),
    slide: str | None = None,
    metadata: dict | None = None,
) -> LayerData:
    """A labels raster (0 = background, label ``l`` painted as ``l + 1``) as a Labels layer.

    ``colours`` (k, 3|4) give label ``i`` (painted ``i + 1``) its colour; default: the cluster
    palette for as many labels as the raster holds.

    The data are the smallest unsigned integers that hold the labels (uint8 up to 255 labels):
    napari shows (u)int8/16 labels as they are, while int32 labels go through a numba-compiled
    mapping whose first use froze the window for 1.5–2 s (the first class or cluster map).
    """
    data = np.asarray(raster.data)
    top = int(data.max(initial=0))
    if data.size and int(data.min()) < 0:
        raise ValueError(f"labels raster {name!r} holds negative values (background is 0)")
    data = data.astype(np.uint8 if top <= 0xFF else np.uint16 if top <= 0xFFFF else np.uint32,
                       copy=False)
    if colours is None:
        colours = cluster_colours(max(int(data.max()), 1))
    kwargs = {
        "name": name,
        "colormap": _label_colormap(colours),
        "opacity": float(opacity),
        "blending": "translucent",
        "metadata": _meta("labels", slide, metadata),
        **_placement(raster.grid, offset),
    }
    return (data, kwargs, "labels")


def mask_layer_data(
    grid: PatchGrid,
    mask: np.ndarray,
    name: str,
    *,
    colour: Sequence[float] = (1.0, 1.0, 0.0, 1.0),
    opacity: float = 0.6,
    offset: Sequence[float] = (0.0, 0.0),
    slide: str | None = None,
    kind: str = "selection",
) -> LayerData:
    """Patches where ``mask`` is true painted in one colour (e.g. a plot selection)."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    lab = np.where(m, 0, -1)
    raster = labels_raster(lab, grid)
    data, kwargs, kind_ = labels_layer_data(
        raster, name, colours=np.asarray([colour]), opacity=opacity, offset=offset, slide=slide
    )
    kwargs["metadata"][META_KEY]["kind"] = kind
    kwargs["metadata"][META_KEY]["n_selected"] = int(m.sum())
    return (data, kwargs, kind_)


def patch_grid_layer_data(
    grid: PatchGrid,
    name: str,
    *,
    opacity: float = 0.35,
    offset: Sequence[float] = (0.0, 0.0),
    slide: str | None = None,
) -> LayerData:
    """The patches to embed as a checkerboard (neighbours alternate colours), so each patch
    footprint is visible over the slide."""
    checker = ((grid.rows // grid.k + grid.cols // grid.k) % 2).astype(np.int64)
    raster = labels_raster(checker, grid)
    colours = np.array([[0.1, 0.8, 1.0, 1.0], [1.0, 0.5, 0.0, 1.0]])
    data, kwargs, kind = labels_layer_data(
        raster, name, colours=colours, opacity=opacity, offset=offset, slide=slide
    )
    kwargs["metadata"][META_KEY]["kind"] = "patch-grid"
    kwargs["metadata"][META_KEY]["n_patches"] = grid.n_patches
    return (data, kwargs, kind)


def tissue_layer_data(
    mask: np.ndarray,
    downsample: float,
    mpp: float | None,
    name: str,
    *,
    opacity: float = 0.4,
    offset: Sequence[float] = (0.0, 0.0),
    slide: str | None = None,
) -> LayerData:
    """A tissue mask of a thumbnail taken at ``downsample`` as a Labels layer on the slide.

    Mask pixel ``j`` stands for level-0 pixels ``j·d … (j+1)·d − 1`` so, like a heatmap cell of
    side ``d`` starting at 0: ``scale = d·mpp``, ``translate = (d/2 − 0.5)·mpp``.
    """
    m = 1.0 if mpp is None else float(mpp)
    d = float(downsample)
    oy, ox = (float(v) for v in offset)
    unit = MICROMETRE if mpp is not None else PIXEL
    kwargs = {
        "name": name,
        "colormap": _label_colormap(np.array([[0.0, 0.9, 0.3, 1.0]])),
        "opacity": float(opacity),
        "blending": "translucent",
        "scale": (d * m, d * m),
        "translate": ((d / 2 - 0.5) * m + oy, (d / 2 - 0.5) * m + ox),
        "units": (unit, unit),
        "metadata": _meta("tissue", slide, {"downsample": d}),
    }
    return (np.asarray(mask, dtype=bool).astype(np.int32), kwargs, "labels")


def patch_boxes_world(
    coords: np.ndarray, patch_size_level0: int, mpp: float | None, offset=(0.0, 0.0)
) -> np.ndarray:
    """(N, 4, 2) rectangles (y, x) in world units covering each patch's level-0 footprint."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    m = 1.0 if mpp is None else float(mpp)
    P = float(patch_size_level0)
    y0 = (c[:, 1] - 0.5) * m + offset[0]
    x0 = (c[:, 0] - 0.5) * m + offset[1]
    y1, x1 = y0 + P * m, x0 + P * m
    return np.stack(
        [np.stack([y0, x0], 1), np.stack([y0, x1], 1), np.stack([y1, x1], 1),
         np.stack([y1, x0], 1)], axis=1,
    )  # fmt: skip


def patch_centre_world(
    coord: Sequence[int], patch_size_level0: int, mpp: float | None, offset=(0.0, 0.0)
) -> tuple[float, float]:
    """World (y, x) of the centre of the patch whose level-0 top-left is ``coord`` (x, y)."""
    m = 1.0 if mpp is None else float(mpp)
    half = patch_size_level0 / 2.0 - 0.5
    return ((coord[1] + half) * m + offset[0], (coord[0] + half) * m + offset[1])


def camera_for_patch(
    coord: Sequence[int],
    patch_size_level0: int,
    mpp: float | None,
    canvas_size: Sequence[int],
    patches_across: float = 5.0,
    offset=(0.0, 0.0),
) -> tuple[tuple[float, float], float]:
    """Camera ``(center, zoom)`` showing a patch in the middle with ``patches_across`` patch
    widths across the smaller canvas side (napari zoom = screen pixels per world unit)."""
    m = 1.0 if mpp is None else float(mpp)
    side = max(1, min(int(s) for s in canvas_size))
    zoom = side / (patches_across * patch_size_level0 * m)
    return patch_centre_world(coord, patch_size_level0, mpp, offset), zoom


def top_hits_layer_data(
    boxes: np.ndarray,
    scores: np.ndarray,
    name: str,
    *,
    colour: str = "magenta",
    edge_width: float = 0.06,
    query_boxes: np.ndarray | None = None,
    slide: str | None = None,
    units: str = MICROMETRE,
) -> LayerData:
    """Top-k patches outlined by square markers covering their footprints, labelled with their
    rank; query patches in cyan labelled "Q".

    A Points layer rather than Shapes: napari updates it in place in a few milliseconds (a
    Shapes layer has to be rebuilt), which keeps a similarity click interactive. ``boxes`` are
    (M, 4, 2) world rectangles (:func:`patch_boxes_world`); ``edge_width`` is relative to the
    patch side.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    label = [str(r) for r in range(1, len(boxes) + 1)]
    edge = [colour] * len(boxes)
    if query_boxes is not None and len(query_boxes):
        q = np.asarray(query_boxes, dtype=np.float64).reshape(-1, 4, 2)
        boxes = np.concatenate([boxes, q]) if len(boxes) else q
        scores = np.concatenate([scores, np.ones(len(q))])
        label += ["Q"] * len(q)
        edge += ["cyan"] * len(q)
    centres = boxes.mean(axis=1) if len(boxes) else np.empty((0, 2))
    side = float(boxes[0, 2, 0] - boxes[0, 0, 0]) if len(boxes) else 1.0
    kwargs = {
        "name": name,
        "symbol": "square",
        "size": side,
        "face_color": "transparent",
        "border_color": edge if edge else colour,
        "border_width": float(edge_width),
        "border_width_is_relative": True,
        "features": {"label": label, "score": scores},
        "text": {"string": "{label}", "color": "white", "size": 10,
                 "anchor": "upper_left"},  # fmt: skip
        "metadata": _meta("top-hits", slide, None),
        "units": (units, units),
    }
    return (centres, kwargs, "points")


def _type_of(layer: Any) -> str:
    return getattr(layer, "_type_string", type(layer).__name__.lower())


def _same_colormap(current: Any, new: Any) -> bool:
    """Whether an Image layer's colormap already is ``new`` (a name or a Colormap)."""
    if isinstance(new, str):
        return getattr(current, "name", None) == new
    try:
        return current.name == new.name and np.allclose(current.colors, new.colors)
    except Exception:
        return False


def _same_label_colours(current: Any, new: Any) -> bool:
    """Whether a Labels layer's colormap paints every label as ``new`` (dict or colormap)."""
    new_d = new if isinstance(new, dict) else getattr(new, "color_dict", None)
    old_d = getattr(current, "color_dict", None)
    if new_d is None or old_d is None or set(old_d) != set(new_d):
        return False
    try:
        return all(np.allclose(np.asarray(old_d[k], dtype=float).ravel(),
                               np.asarray(new_d[k], dtype=float).ravel()) for k in new_d)
    except Exception:
        return False


def _same_features(current: Any, new: Any) -> bool:
    """Whether a layer's features table (a DataFrame) already holds ``new`` (dict or table)."""
    try:
        import pandas as pd

        table = new if isinstance(new, pd.DataFrame) else pd.DataFrame(new)
        return list(current.columns) == list(table.columns) and len(current) == len(table) \
            and all(np.array_equal(np.asarray(current[c]), np.asarray(table[c]))
                    for c in table.columns)  # fmt: skip
    except Exception:  # noqa: BLE001 - not comparable: set them
        return False


def _differs(a: Any, b: Any) -> bool:
    try:
        if isinstance(a, str) or isinstance(b, str):
            return str(a) != str(b)
        return not np.array_equal(np.asarray(a), np.asarray(b))
    except Exception:
        return True


#: kinds updated in place (cheap, keeps the layer object); any other kind (Shapes: its data,
#: features, colours and text must change together) is rebuilt at the same index
_IN_PLACE = ("image", "labels", "points")


def _can_update(layer: Any, data: Any, kind: str) -> bool:
    if _type_of(layer) != kind or kind not in _IN_PLACE or getattr(layer, "multiscale", False):
        return False
    try:
        new = np.asarray(data)
    except Exception:
        return False
    if kind == "points":
        return new.ndim == 2 and new.shape[-1] == np.asarray(layer.data).shape[-1]
    if kind == "image" and getattr(layer, "rgb", False):
        return False
    return new.ndim == np.ndim(layer.data)


def _update_in_place(layer: Any, data: Any, kwargs: dict, kind: str) -> None:
    """Set what changed (every napari attribute change emits events and may redraw)."""
    rest = {k: v for k, v in kwargs.items() if k not in ("name", "visible", "metadata")}
    if kind == "points":
        with layer.events.blocker_all():
            layer.data = data
            if "features" in rest:
                layer.features = rest.pop("features")
        for key in ("text", "border_color", "face_color"):  # lengths follow the new data
            if key in rest:
                setattr(layer, key, rest.pop(key))
    for key in ("scale", "translate"):
        if key in rest and not np.allclose(getattr(layer, key), rest.pop(key)):
            setattr(layer, key, kwargs[key])
    if "units" in rest:
        units = rest.pop("units")
        if tuple(str(u) for u in layer.units) != tuple(str(u) for u in units):
            layer.units = units
    if "colormap" in rest:
        cmap = rest.pop("colormap")
        same = _same_label_colours if kind == "labels" else _same_colormap
        if not same(layer.colormap, cmap):
            layer.colormap = cmap
    if kind != "points":
        layer.data = data
    if "features" in rest and _same_features(layer.features, rest["features"]):
        rest.pop("features")  # setting them again makes napari rebuild the layer's table
    for key, value in rest.items():  # contrast limits, opacity, blending, size, ...
        if _differs(getattr(layer, key), value):
            setattr(layer, key, value)
    layer.metadata = kwargs.get("metadata", layer.metadata)
    if kind == "points":
        layer.refresh()


def _restore_selection(layers: Any, selected: list, current: Any) -> None:
    """Make ``viewer.layers.selection`` the set ``selected`` again (active = the only one)."""
    sel = layers.selection
    want = [la for la in selected if la in layers]
    if set(sel) != set(want):
        sel.clear(keep_current=True)
        sel.update(want)
    if hasattr(sel, "_current") and (current is None or current in layers):
        if sel._current is not current:
            sel._current = current


def _add_unselected(viewer: Any, kind: str, data: Any, kwargs: dict) -> Any:
    """``viewer.add_<kind>`` without napari making the new layer the active one (its layer
    list's ``_activate_on_insert`` switch, off for this insert): switching the layer controls
    to it and back cost ~20 ms of the tick that adds it, and the user's selection stays."""
    layers = viewer.layers
    switch = getattr(layers, "_activate_on_insert", None)
    if isinstance(switch, bool):
        layers._activate_on_insert = False
    try:
        return getattr(viewer, f"add_{kind}")(data, **kwargs)
    finally:
        if isinstance(switch, bool):
            layers._activate_on_insert = switch


def upsert_layer(viewer: Any, layer_data: LayerData) -> Any:
    """Add the layer, or update the layer of that name; returns the layer now in the viewer.

    - An Image, Labels or Points layer of the same type is updated in place (only what
      changed is set, so a similarity click stays within a few tens of milliseconds; a Points
      layer may change its number of points).
    - Any other existing layer of that name (another type, another dimensionality, a Shapes
      layer, whose data, features, colours and text must change together) is removed and the
      new one added at the same index.
    - The layer is made visible, unless ``kwargs["visible"]`` is False (layers added hidden,
      such as probability maps: those keep the visibility the user gave them).
    - The viewer's layer selection (selected set, active and current layer) is left as it
      was: napari selects a newly added layer, which would take the user's selection away.
      A replaced layer that was selected stays selected as its replacement.

    Used from the main thread only.
    """
    data, kwargs, kind = layer_data
    name = kwargs["name"]
    layers = viewer.layers
    existing = layers[name] if name in layers else None
    if existing is not None and _can_update(existing, data, kind):
        try:
            _update_in_place(existing, data, kwargs, kind)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            pass  # inconsistent in-place change: rebuild the layer below
        else:
            if kwargs.get("visible", True) and not existing.visible:
                existing.visible = True
            apply_legend(existing)
            return existing

    sel = layers.selection
    selected, current = list(sel), getattr(sel, "_current", None)
    index = None
    if existing is not None:
        index = layers.index(existing)
        if kwargs.get("visible", True) is False and existing.visible:
            kwargs = {**kwargs, "visible": True}
        layers.remove(existing)
    layer = _add_unselected(viewer, kind, data, kwargs)
    if index is not None:
        now = layers.index(layer)
        if now != index:
            layers.move(now, index)
    swap = {id(existing): layer} if existing is not None else {}
    _restore_selection(layers, [swap.get(id(la), la) for la in selected],
                       swap.get(id(current), current))
    _legend_later(layer, viewer)
    return layer
