"""npe2 reader: whole-slide images as lazy multiscale RGB image layers in micrometres."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

from ..slide import MissingMppWarning, Slide, open_slide, slide_kind
from ..slide.open import TIFF_SUFFIXES, special_file_kind

LayerData = tuple  # (data, kwargs, layer_type)

MICROMETRE = "micrometer"
PIXEL = "pixel"


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return the reader when ``path`` looks like a whole-slide image, else None (never raises).

    Plain PNG/JPEG and small non-tiled TIFFs are left to napari's own readers.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_is_ours(p) for p in paths):
        return None
    return read_slides


def _is_ours(path: str | Path) -> bool:
    try:
        if special_file_kind(path):
            return True  # a FIFO or device named like a slide: our reader refuses it, by name
        kind = slide_kind(path)
        if kind is None:
            return False
        if kind == "tiff" and str(path).lower().endswith(TIFF_SUFFIXES) and not str(
            path
        ).lower().endswith((".ome.tif", ".ome.tiff")):
            return _is_tiled_or_pyramidal(Path(path))
        return True
    except Exception:
        return False


def _is_tiled_or_pyramidal(path: Path) -> bool:
    """A generic .tif is ours when tiled or multi-level; unreadable ones too, to say why."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return bool(page.is_tiled or len(tif.series[0].levels) > 1)
    except Exception:
        return True  # not a readable TIFF: our reader names the file and the problem


def read_slides(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return [slide_layer_data(open_slide(p)) for p in paths]


def slide_layer_data(slide: Slide) -> LayerData:
    """One multiscale RGB image layer; scale in µm when the slide records mpp."""
    if slide.mpp is None:
        warnings.warn(
            f"{slide.path}: the slide does not record its pixel size (microns per pixel); it is "
            "shown in pixel units. Set the pixel size in the 'Slide info' panel (Plugins > "
            "napari-gpfm > Slide info), or pass --mpp on the command line.",
            MissingMppWarning,
            stacklevel=2,
        )
    return (slide.levels, slide_layer_kwargs(slide), "image")


def slide_layer_kwargs(slide: Slide) -> dict:
    spacing = slide.mpp if slide.mpp is not None else 1.0
    unit = MICROMETRE if slide.mpp is not None else PIXEL
    metadata = slide.metadata()
    metadata["slide"] = slide  # the live object, for widgets in the same session
    return {
        "name": slide.name,
        "rgb": True,
        "multiscale": True,
        "contrast_limits": (0, 255),
        "scale": (spacing, spacing),
        "units": (unit, unit),
        "metadata": {"napari_gpfm": metadata},
    }


def layer_slide(layer) -> Slide | None:
    """The Slide behind a layer this reader made, or None."""
    meta = getattr(layer, "metadata", {}).get("napari_gpfm")
    return meta.get("slide") if isinstance(meta, dict) else None


def set_layer_mpp(layer, mpp: float) -> Slide:
    """Apply a user-given pixel size to a slide layer: µm scale, units and metadata follow.

    The value goes through the one pixel-size validator (:func:`napari_gpfm.slide.validate_mpp`
    via ``Slide.with_mpp``): an implausible one raises ``ImplausibleMppError`` (a
    ``ValueError`` naming the slide, the value and the plausible range) and the layer is left
    as it was."""
    slide = layer_slide(layer)
    if slide is None:
        raise ValueError(f"layer {layer.name!r} was not opened by napari-gpfm")
    slide = slide.with_mpp(mpp, source="set in the 'Slide info' panel")
    meta = dict(layer.metadata["napari_gpfm"])
    meta.update(mpp=slide.mpp, mpp_source=slide.mpp_source, slide=slide)
    layer.metadata = {**layer.metadata, "napari_gpfm": meta}
    layer.scale = (slide.mpp, slide.mpp)
    layer.units = (MICROMETRE, MICROMETRE)
    return slide
