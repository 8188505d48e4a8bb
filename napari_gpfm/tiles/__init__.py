"""Tiles: tissue detection, exact-mpp patch grids and parallel patch loading.

Tissue detection methods (``TissueParams(method=...)``, :data:`TISSUE_METHODS`): "auto" (the
default: Otsu on a bimodal saturation histogram, else an absolute H&E rule), "otsu", "fixed" and
"none" (the whole image is tissue). ``TissueMask.summary`` says in one line what was found.

``tissue`` and ``grid`` need only numpy/scipy/scikit-image; the torch-based ``loader`` is imported
on first use of its names.
"""

from __future__ import annotations

from typing import Any

from .grid import (
    PRESETS,
    GridSpec,
    TileGrid,
    best_level,
    get_preset,
    magnification_to_mpp,
    make_grid,
    mpp_to_magnification,
)
from .tissue import METHODS as TISSUE_METHODS
from .tissue import (
    NoTissueError,
    TissueMask,
    TissueParams,
    TissuePolygon,
    detect_tissue,
    no_tissue_message,
)

_LOADER_NAMES = {
    "BatchStream", "PatchDataset", "iter_batches", "make_loader", "default_num_workers"
}

__all__ = [
    "PRESETS",
    "TISSUE_METHODS",
    "GridSpec",
    "NoTissueError",
    "TileGrid",
    "TissueMask",
    "TissueParams",
    "TissuePolygon",
    "best_level",
    "detect_tissue",
    "get_preset",
    "magnification_to_mpp",
    "make_grid",
    "mpp_to_magnification",
    "no_tissue_message",
    *sorted(_LOADER_NAMES),
]


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
