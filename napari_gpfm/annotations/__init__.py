"""Annotations: QuPath GeoJSON in and out, and shapes -> patch labels.

No napari or Qt. Public names are re-exported lazily.
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

_EXPORTS = {
    "geojson": (
        "Annotation", "AnnotationList", "GeoJSONError", "read_geojson", "write_geojson",
        "annotations_from_geojson", "annotations_to_geojson", "patch_features", "class_polygons",
        "trace_mask", "is_ignored_class",
    ),
    "labels": ("ClassCoverage", "PatchLabels", "labels_from_annotations", "square_coverage",
               "unlabelled_reasons"),
}  # fmt: skip
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
