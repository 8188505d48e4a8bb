"""Embeddings: recipes, TRIDENT-compatible feature files and the resumable embed run.

Headless API (the napari widgets and the CLI call exactly these)::

    from napari_gpfm.embeddings import embed_slide, embed, open_store
    from napari_gpfm.tiles import GridSpec, PRESETS, TissueParams

    for p in embed_slide("slide.svs", encoder, PRESETS["gpfm-20x-224"], "out"):
        print(p.done, p.total, p.rate, p.eta_s)      # closing the generator cancels
    # p.path == out/0.5mpp_224px_0px_overlap/features_gpfm/slide.h5
    store = open_store(p.path, expected_slide=slide)  # refuses incomplete / other slide files
    store = find_store("out", slide, recipe)          # the finished store, None, or raises

Nothing lost, nothing silently wrong: a full disk or an I/O error raises one
``OutputWriteError`` (the ``.partial`` file keeps what was written, a previous store is
untouched, the process never crashes); a store with NaN/inf features is never marked complete
(``NonFiniteFeaturesError``); damaged features, coords or metadata raise ``DamagedStoreError``
naming the store (metadata checked at open, coords and features on their first read).
"""

from typing import Any

from napari_gpfm.tiles.tissue import NoTissueError

from .recipe import KEY_FIELDS, EmbeddingRecipe
from .tiling import Level0Tiling, spec_for_slide
from .store import (
    DamagedStoreError,
    ExternalFeaturesWarning,
    FeatureStore,
    IncompleteStoreError,
    NonFiniteFeaturesError,
    OutputWriteError,
    PrecisionMismatchError,
    RecipeMismatchError,
    SlideMismatchError,
    StoreError,
    StoreWriter,
    find_store,
    open_store,
    partial_path,
    recipe_store_path,
    store_path,
    tiling_dir_name,
)

# The run needs torch; it is imported on first use so that `napari-gpfm --help` and readers of
# feature files stay light.
_RUN_NAMES = {"EmbedProgress", "default_spec", "embed", "embed_slide", "make_recipe",
              "resolve_device"}

__all__ = [
    "KEY_FIELDS",
    "DamagedStoreError",
    "EmbedProgress",
    "EmbeddingRecipe",
    "ExternalFeaturesWarning",
    "FeatureStore",
    "IncompleteStoreError",
    "Level0Tiling",
    "NoTissueError",
    "NonFiniteFeaturesError",
    "OutputWriteError",
    "PrecisionMismatchError",
    "RecipeMismatchError",
    "SlideMismatchError",
    "StoreError",
    "StoreWriter",
    "default_spec",
    "embed",
    "embed_slide",
    "find_store",
    "make_recipe",
    "open_store",
    "partial_path",
    "recipe_store_path",
    "resolve_device",
    "spec_for_slide",
    "store_path",
    "tiling_dir_name",
]


def __getattr__(name: str) -> Any:
    if name in _RUN_NAMES:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
