"""PathoTune: multi-modal prompt tuning of a frozen foundation model (arXiv 2403.16497).

Task visual prompts (TVP, :mod:`.prompts`), task text prompts (TTP, :mod:`.text`) and instance
visual prompts (IVP, the Visual Refine Module in :mod:`.prompts`) around a frozen timm ViT
(:mod:`.model`), each switchable; training as a progress generator (:mod:`.train`); prediction
over tiles or a slide grid (:mod:`.predict`); classifier files bound to their backbone
(:mod:`.io`). The classifier implements :class:`napari_gpfm.analyses.classifier.Classifier`,
like the linear probe: the same ``TrainResult``, ``Prediction`` and file loader
(:func:`napari_gpfm.jobs.classifiers.load_classifier`). Headless use::

    from napari_gpfm.encoders import load_encoder
    from napari_gpfm import pathotune as pt

    enc = load_encoder("gpfm")
    result = pt.run(pt.train_from_arrays(enc, tiles, labels, ["tumour", "stroma"]))
    result.classifier.save("tumour.safetensors")
    proba = pt.predict_arrays(pt.load_pathotune("tumour.safetensors", enc), more_tiles)

The package sits between ``jobs`` and ``analyses`` in the import layers: it uses the analyses'
``Prediction`` and metrics, and ``analyses`` never imports it.

Torch is imported on first use of a name, so importing the package stays cheap.
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

_EXPORTS = {
    "prompts": ("TaskVisualPrompts", "VisualRefineModule"),
    "text": ("DEFAULT_TEMPLATE", "TextTemplate", "TaskTextPrompts", "MiniLMTextEncoder",
             "get_text_encoder", "encode_sentences"),
    "model": ("PromptConfig", "PathoTuneModel", "PathoTuneClassifier", "TokenLayout",
              "build_classifier", "backbone_identity"),
    "train": ("TrainConfig", "TrainProgress", "TrainResult", "TuneOptions", "tune",
              "train_from_arrays", "train_from_slide", "read_patches", "stratified_split",
              "run"),
    "predict": ("PredictProgress", "GeometryMismatchError", "predict_arrays", "predict_slide",
                "store_patches"),
    "io": ("save_classifier", "load_pathotune", "read_header", "ClassifierFileError",
           "BackboneMismatchError"),
}  # fmt: skip
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
