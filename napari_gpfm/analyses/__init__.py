"""Analyses of patch embeddings: heatmap rasters, clusters, similarity, linear probes, export,
and the classifier surface both classifier kinds share (:mod:`.classifier`).

Pure numpy/scipy/scikit-learn: no napari, Qt or torch. Public names are re-exported lazily, so
``import napari_gpfm.analyses`` stays cheap until a function is used.
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

_EXPORTS = {
    "heatmap": ("PatchGrid", "Raster", "patch_grid", "heatmap_raster", "labels_raster"),
    "clusters": ("ClusterResult", "kmeans", "cluster_table", "pca", "umap", "umap_available"),
    "similarity": ("SimilarityIndex", "MultiStoreIndex", "ModelMismatchError"),
    "probe": (
        "LinearProbe", "CVReport", "fit_probe", "cv_report", "load_probe", "ProbeFileError",
        "RecipeMismatchError", "balanced_accuracy",
    ),
    "classifier": (
        "Classifier", "ClassifierFileError", "PatchSet", "Prediction", "TrainResult", "entropy",
        "prob_column",
    ),
    "export": ("write_table", "write_csv", "write_parquet", "apply_colormap", "write_heatmap_png"),
}  # fmt: skip
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
