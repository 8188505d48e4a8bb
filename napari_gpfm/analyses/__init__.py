"""Analyses of patch embeddings: heatmap rasters, clusters, similarity, linear probes, export.

Pure numpy/scipy/scikit-learn: no napari, Qt or torch. Public names are re-exported lazily, so
``import napari_gpfm.analyses`` stays cheap until a function is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "heatmap": ("PatchGrid", "Raster", "patch_grid", "heatmap_raster", "labels_raster"),
    "clusters": ("ClusterResult", "kmeans", "cluster_table", "pca", "umap", "umap_available"),
    "similarity": ("SimilarityIndex", "MultiStoreIndex", "ModelMismatchError"),
    "probe": (
        "LinearProbe", "CVReport", "fit_probe", "cv_report", "load_probe", "entropy",
        "ProbeFileError", "RecipeMismatchError",
    ),
    "export": ("write_table", "write_csv", "write_parquet", "apply_colormap", "write_heatmap_png"),
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
