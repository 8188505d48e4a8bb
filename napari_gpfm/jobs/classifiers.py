"""The one loader of classifier files, whatever their kind.

Both kinds implement :class:`napari_gpfm.analyses.classifier.Classifier`; their files differ:

- ``linear``: the linear probe, an ``.npz`` file (a zip: coefficients and a JSON header), read
  by :func:`~napari_gpfm.analyses.probe.load_probe`;
- ``pathotune``: PathoTune, a ``.safetensors`` file (prompt tensors and JSON metadata), read by
  :func:`~napari_gpfm.pathotune.io.load_pathotune`.

:func:`load_classifier` picks the kind from the file's first bytes (a zip signature, or a
safetensors header: an 8-byte length then ``{``), never from its name, so a renamed file still
loads and a file of neither kind is refused naming it
(:class:`~napari_gpfm.analyses.classifier.ClassifierFileError`); a damaged file of a known kind
raises that kind's error (also a ``ClassifierFileError``). It lives in ``jobs`` because it needs
both kinds and ``analyses`` never imports ``pathotune``. Saving is ``classifier.save(path)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..analyses.classifier import Classifier, ClassifierFileError
from ..errors import require_file

__all__ = ["KINDS", "classifier_kind", "load_classifier"]

#: Classifier kinds (``train-classifier --method``) and their file suffixes.
KINDS = {"linear": ".npz", "pathotune": ".safetensors"}
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def classifier_kind(path: str | os.PathLike) -> str:
    """``"linear"`` or ``"pathotune"``, from the file's content. Raises
    :class:`~napari_gpfm.errors.InputFileNotFoundError` for a missing file and
    :class:`ClassifierFileError` for a file of neither kind."""
    path = require_file(path, "classifier file")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except IsADirectoryError:
        raise ClassifierFileError(path, "is a folder, not a classifier file") from None
    if head[:4] in _ZIP_MAGIC:
        return "linear"
    if len(head) == 9 and head[8:9] == b"{":
        return "pathotune"
    what = "an empty file" if not head else "neither kind"
    raise ClassifierFileError(
        path, f"not a classifier file ({what}): napari-gpfm reads linear probes (.npz, "
              "train-classifier --method linear) and PathoTune classifiers (.safetensors, "
              "train-classifier --method pathotune)")  # fmt: skip


def load_classifier(path: str | os.PathLike, *, device: str = "cpu",
                    weights: str | os.PathLike | None = None,
                    encoder: Any = None) -> Classifier:  # fmt: skip
    """Read a classifier file of either kind (see the module docstring).

    ``device``, ``weights`` and ``encoder`` concern PathoTune only: its backbone is loaded by
    card name (with ``weights`` when given, on ``device``) unless ``encoder`` is given; a
    backbone other than the recorded one is refused
    (:class:`~napari_gpfm.pathotune.io.BackboneMismatchError`).
    """
    path = Path(path)
    kind = classifier_kind(path)
    if kind == "linear":
        from ..analyses.probe import load_probe

        return load_probe(path)
    from ..pathotune.io import load_pathotune

    return load_pathotune(path, encoder=encoder, device=device, weights=weights)
