"""napari-gpfm: whole-slide images and GPFM foundation-model embeddings in napari.

This module imports neither torch nor Qt: napari discovers the plugin from ``napari.yaml``
and imports each command only when it is used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
