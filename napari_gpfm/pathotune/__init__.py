"""PathoTune: multi-modal prompt tuning of a frozen foundation model (arXiv 2403.16497).

Task visual prompts (TVP, :mod:`.prompts`), task text prompts (TTP, :mod:`.text`) and instance
visual prompts (IVP, the Visual Refine Module in :mod:`.prompts`) around a frozen timm ViT
(:mod:`.model`), each switchable; training as a progress generator (:mod:`.train`); prediction
over tiles or a slide grid (:mod:`.predict`); classifier files bound to their backbone
(:mod:`.io`). Headless use::

    from napari_gpfm.encoders import load_encoder
    from napari_gpfm import pathotune as pt

    enc = load_encoder("gpfm")
    result = pt.run(pt.train_from_arrays(enc, tiles, labels, ["tumour", "stroma"]))
    pt.save_classifier(result.classifier, "tumour.safetensors")
    proba = pt.predict_arrays(pt.load_classifier("tumour.safetensors", enc), more_tiles)

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
    "train": ("TrainConfig", "TrainProgress", "TrainResult", "train_classifier",
              "train_from_arrays", "train_from_slide", "read_patches", "stratified_split",
              "balanced_accuracy", "run"),
    "predict": ("PredictProgress", "PredictResult", "GeometryMismatchError", "predict_arrays",
                "predict_slide", "predict_store"),
    "io": ("save_classifier", "load_classifier", "read_header", "ClassifierFileError",
           "BackboneMismatchError"),
}  # fmt: skip
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
