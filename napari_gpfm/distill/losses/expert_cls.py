"""Expert CLS distillation loss (GPFM, Ma et al. 2024, arXiv 2407.18449, §"Expert distillation").

    L_cls = 1 - mean_batch cos(h(s_cls), e_cls)

where h is the student's projection head for the expert and e_cls the frozen expert's CLS feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertClsLoss(nn.Module):
    """One minus the mean cosine similarity between projected student and expert CLS tokens."""

    def forward(self, student: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(student.float(), expert.float(), dim=-1).mean()
