"""Optional supervised cross-entropy on tile-folder class labels.

Standard softmax cross-entropy, H(y, softmax(z)) = -log softmax(z)_y, averaged over labelled
global crops; unlabelled crops (label -1) are ignored, and a batch without labels gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..sources import UNLABELLED


class SupervisedLoss(nn.Module):
    """Cross-entropy of a linear classifier on the student's global CLS tokens."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not (labels != UNLABELLED).any():
            return logits.sum() * 0.0  # keeps the graph (and DDP) intact
        return F.cross_entropy(
            logits.float(), labels, ignore_index=UNLABELLED, label_smoothing=self.label_smoothing
        )
