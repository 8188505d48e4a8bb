"""Expert CLS distillation loss (GPFM, Ma et al. 2024, arXiv 2407.18449, §"Expert distillation").

``cosine`` (GPFM's ViT-L run, ``distill.loss_name: radio``)::

    L_cls = 1 - mean_batch cos(h(s_cls), e_cls)

``kl`` (GPFM's ``KLDIV`` option, temperature 1)::

    L_cls = mean_batch KL(softmax(e_cls) || softmax(h(s_cls)))

where h is the student's projection head for the expert and e_cls the frozen expert's CLS
target (its embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("cosine", "kl")


class ExpertClsLoss(nn.Module):
    """Cosine or softmax-KL distance between projected student and expert CLS targets."""

    def __init__(self, kind: str = "cosine") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"expert CLS loss must be one of {', '.join(KINDS)}, not {kind!r}")
        self.kind = kind

    def forward(self, student: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        student, expert = student.float(), expert.float()
        if self.kind == "kl":
            log_p = F.log_softmax(student, dim=-1).reshape(-1, student.shape[-1])
            target = F.softmax(expert, dim=-1).reshape(-1, expert.shape[-1])
            return F.kl_div(log_p, target, reduction="batchmean")
        return 1.0 - F.cosine_similarity(student, expert, dim=-1).mean()
