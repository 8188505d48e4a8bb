"""Slide backends: one file per library, imported lazily by :func:`napari_gpfm.slide.open_slide`."""
