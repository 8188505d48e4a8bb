"""napari-facing layer: reader, sample data and analysis results as LayerData (no Qt)."""
