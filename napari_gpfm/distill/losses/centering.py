"""Teacher centring shared by the DINO and iBOT losses (Caron et al. 2021, eq. (2)).

The teacher's logits are centred and sharpened, p_t = softmax((t − c) / τ_t), and the centre
follows c ← m·c + (1 − m)·mean(t), the mean taken over every row of every process. Rows may be
CLS tokens (DINO) or masked patch tokens (iBOT, where a batch can hold none).

``centering="sinkhorn_knopp"`` (DINOv2's ``train.centering`` option, from SwAV) replaces the
centre by three Sinkhorn-Knopp iterations over every row of every process: the targets are made
to use every prototype equally over the batch (each prototype's total mass B/K) while every row
stays a distribution; no centre is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum


def cross_entropy_soft(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, temp: float
) -> torch.Tensor:
    """Per-row H(p_t, softmax(s / τ_s)) = -Σ_k p_t,k log softmax(s / τ_s)_k."""
    return -(teacher_probs * F.log_softmax(student_logits / temp, dim=-1)).sum(dim=-1)


SINKHORN_ITERATIONS = 3


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float,
                   n_iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """Rows of Q ∝ exp(t / τ) balanced over the prototypes (all processes' rows together):
    DINOv2's ``sinkhorn_knopp_teacher``. Each returned row sums to 1."""
    logits = teacher_logits.float() / teacher_temp
    stats = all_reduce_sum(logits.new_tensor([float(len(logits))]))
    n_rows = stats[0]
    if len(logits) == 0 and n_rows == 0:
        return logits
    # exp of a shifted copy: the same Q after normalisation, without overflow
    top = _all_max(logits.max() if len(logits) else logits.new_tensor(-float("inf")))
    q = torch.exp(logits - top).t()  # K x B
    k = q.shape[0]
    q /= all_reduce_sum(q.sum().reshape(1))
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n_rows
    q *= n_rows
    return q.t()


def _all_max(value: torch.Tensor) -> torch.Tensor:
    """The maximum of a scalar over all processes."""
    import torch.distributed as dist

    value = value.reshape(1).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value[0]


class CenteredTeacherLoss(nn.Module):
    """Base for losses against a centred teacher: owns the ``center`` buffer and its EMA (or,
    with ``centering="sinkhorn_knopp"``, balances the targets by Sinkhorn-Knopp instead)."""

    center: torch.Tensor

    def __init__(self, n_prototypes: int, student_temp: float, center_momentum: float,
                 centering: str = "centering") -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(
                f"centering must be 'centering' or 'sinkhorn_knopp', not {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t − c) / τ_t), computed before :meth:`update_center` sees this batch (or
        the Sinkhorn-Knopp targets)."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher logit over all processes; a batch with no rows is skipped.
        Sinkhorn-Knopp keeps no centre (as in DINOv2)."""
        if self.centering == "sinkhorn_knopp":
            return
        logits = teacher_logits.float()
        stats = all_reduce_sum(torch.cat([logits.sum(dim=0), logits.new_tensor([len(logits)])]))
        count = stats[-1]
        if count > 0:
            batch_center = (stats[:-1] / count).unsqueeze(0)
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
