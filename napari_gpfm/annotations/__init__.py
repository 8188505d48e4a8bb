"""Annotations: QuPath GeoJSON in and out, and shapes -> patch labels.

No napari or Qt. Public names are re-exported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "geojson": (
        "Annotation", "GeoJSONError", "read_geojson", "write_geojson", "annotations_from_geojson",
        "annotations_to_geojson", "patch_features", "class_polygons", "trace_mask",
        "is_ignored_class",
    ),
    "labels": ("PatchLabels", "labels_from_annotations", "square_coverage"),
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
