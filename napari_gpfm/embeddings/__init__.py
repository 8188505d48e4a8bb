"""Embeddings: recipes, TRIDENT-compatible feature files and the resumable embed run.

Headless API (the napari widgets and the CLI call exactly these)::

    from napari_gpfm.embeddings import embed_slide, embed, open_store
    from napari_gpfm.tiles import GridSpec, PRESETS, TissueParams

    for p in embed_slide("slide.svs", encoder, PRESETS["gpfm-20x-224"], "out"):
        print(p.done, p.total, p.rate, p.eta_s)      # closing the generator cancels
    store = open_store("out/features_gpfm/slide.h5")  # refuses incomplete / other recipes
"""

from typing import Any

from napari_gpfm.tiles.tissue import NoTissueError

from .recipe import KEY_FIELDS, EmbeddingRecipe
from .store import (
    ExternalFeaturesWarning,
    FeatureStore,
    IncompleteStoreError,
    RecipeMismatchError,
    StoreError,
    StoreWriter,
    open_store,
    partial_path,
    store_path,
)

# The run needs torch; it is imported on first use so that `napari-gpfm --help` and readers of
# feature files stay light.
_RUN_NAMES = {"EmbedProgress", "default_spec", "embed", "embed_slide", "make_recipe",
              "resolve_device"}

__all__ = [
    "KEY_FIELDS",
    "EmbedProgress",
    "EmbeddingRecipe",
    "ExternalFeaturesWarning",
    "FeatureStore",
    "IncompleteStoreError",
    "NoTissueError",
    "RecipeMismatchError",
    "StoreError",
    "StoreWriter",
    "default_spec",
    "embed",
    "embed_slide",
    "make_recipe",
    "open_store",
    "partial_path",
    "resolve_device",
    "store_path",
]


def __getattr__(name: str) -> Any:
    if name in _RUN_NAMES:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
