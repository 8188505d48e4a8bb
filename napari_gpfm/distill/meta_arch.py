"""GPFM meta-architecture: self-distillation (DINO, iBOT, KoLeo) + expert distillation.

``student`` and ``teacher`` are ``nn.ModuleDict``s with matching keys (``backbone``,
``dino_head``, ``ibot_head`` when separate), so the EMA update is one loop over the teacher's
keys; the student alone carries the expert heads and the optional supervised head. A term is on
when its weight is positive, lands in ``loss_dict`` under its own name, and enters the total
weighted. Experts are looped as a dict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .backbone import MaskedViT, build_backbone, freeze_all_but_last
from .collapse import image_dependent_information
from .config import Config, ConfigError
from .experts import ExpertWeights, FrozenExpert
from .heads import DINOHead, ExpertHead
from .losses import (
    DINOClsLoss,
    ExpertClsLoss,
    ExpertPatchLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    SupervisedLoss,
)
from .masking import N_GLOBAL_CROPS

Batch = dict[str, torch.Tensor]
LAST_LAYER_PREFIXES = ("dino_head.last_layer", "ibot_head.last_layer")
EXPERT_HEADS = "expert_heads."
#: Diagnostics in a step's terms that are not losses (not in the total).
DIAGNOSTICS = ("teacher_info",)


def is_last_layer(name: str, cfg: Config) -> bool:
    """Prototype last layers, and the expert heads' last layers when
    ``experts.freeze_head_last_layer`` (GPFM: every parameter named ``last_layer``)."""
    if name.startswith(LAST_LAYER_PREFIXES):
        return True
    return (cfg["experts"]["freeze_head_last_layer"] and name.startswith(EXPERT_HEADS)
            and ".last_layer." in name)


def _prototype_head(cfg: Config, section: str, embed_dim: int) -> DINOHead:
    s = cfg[section]
    return DINOHead(
        embed_dim, s["n_prototypes"], s["hidden_dim"], s["bottleneck_dim"], s["n_layers"],
        learn_gain=s["learn_prototype_gain"],
    )


class TeacherNetwork(nn.ModuleDict):
    """EMA teacher: prototype logits of the global crops' CLS and masked patch tokens."""

    def __init__(self, modules: dict[str, nn.Module], uses_dino: bool, uses_ibot: bool) -> None:
        super().__init__(modules)
        self.uses_dino, self.uses_ibot = uses_dino, uses_ibot

    def ibot_prototypes(self) -> nn.Module:
        """The iBOT head: its own, or the DINO head when shared."""
        return self["ibot_head"] if "ibot_head" in self else self["dino_head"]

    def forward(self, global_crops: torch.Tensor, mask_indices: torch.Tensor) -> Batch:
        cls, patch = self["backbone"](global_crops)
        out: Batch = {}
        if self.uses_dino:
            out["dino"] = self["dino_head"](cls)
        if self.uses_ibot:
            out["ibot"] = self.ibot_prototypes()(patch.flatten(0, 1)[mask_indices])
        return out


class StudentNetwork(TeacherNetwork):
    """Student: one masked pass over the global crops, one pass over the local crops.

    Besides the teacher's keys it holds ``expert_heads`` and optionally ``supervised_head``;
    ``expert_weights`` says which expert heads see CLS and/or patch tokens.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        uses_dino: bool,
        uses_ibot: bool,
        expert_weights: dict[str, ExpertWeights],
    ) -> None:
        super().__init__(modules, uses_dino, uses_ibot)
        self.expert_weights = dict(expert_weights)

    def forward(  # type: ignore[override]
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor,
        masks: torch.Tensor,
        mask_indices: torch.Tensor,
    ) -> Batch:
        backbone: MaskedViT = self["backbone"]
        cls, patch = backbone(global_crops, masks if self.uses_ibot else None)
        out: Batch = {"global_cls": cls}
        if self.uses_dino:
            out["dino_global"] = self["dino_head"](cls)
            if len(local_crops):
                out["dino_local"] = self["dino_head"](backbone(local_crops)[0])
        if self.uses_ibot:
            out["ibot"] = self.ibot_prototypes()(patch.flatten(0, 1)[mask_indices])
        for name, head in self["expert_heads"].items():
            if self.expert_weights[name].cls > 0:
                out[f"expert_cls/{name}"] = head(cls)
            if self.expert_weights[name].patch > 0:
                out[f"expert_patch/{name}"] = head(patch)
        if "supervised_head" in self:
            out["supervised"] = self["supervised_head"](cls)
        return out


class DistillMetaArch(nn.Module):
    """Student, EMA teacher, frozen experts and losses; ``forward_backward`` runs one micro-step."""

    def __init__(
        self,
        cfg: Config,
        experts: dict[str, FrozenExpert],
        expert_weights: dict[str, ExpertWeights],
        n_classes: int = 0,
        load_init: bool = True,
    ) -> None:
        """``load_init``: read ``student.init`` (False when a checkpoint will be restored)."""
        super().__init__()
        self.w = {k: float(cfg[k]["weight"]) for k in ("dino", "ibot", "koleo", "supervised")}
        self.expert_weights = dict(expert_weights)
        use_dino, use_ibot = self.w["dino"] > 0, self.w["ibot"] > 0
        separate_ibot = use_ibot and cfg["ibot"]["separate_head"]

        student_backbone = build_backbone(cfg, cfg["student"]["drop_path_rate"])
        student_backbone.mask_token.requires_grad_(use_ibot)
        self.init_report = None
        if load_init:
            from .student_init import init_student

            self.init_report = init_student(student_backbone.vit, cfg)
        self.frozen_params = freeze_all_but_last(
            student_backbone, cfg["student"]["trainable_blocks"])
        student_backbone.grad_checkpointing = bool(cfg["student"]["grad_checkpointing"])
        dim = student_backbone.embed_dim
        self.patch_size = student_backbone.patch_size
        student = StudentNetwork(
            {"backbone": student_backbone}, use_dino, use_ibot, expert_weights
        )
        if use_dino or (use_ibot and not separate_ibot):
            student["dino_head"] = _prototype_head(cfg, "dino", dim)
        if separate_ibot:
            student["ibot_head"] = _prototype_head(cfg, "ibot", dim)
        teacher = TeacherNetwork(
            {"backbone": build_backbone(cfg, drop_path_rate=0.0)}, use_dino, use_ibot
        )
        for key in ("dino_head", "ibot_head"):
            if key in student:
                teacher[key] = _prototype_head(cfg, key.split("_")[0], dim)
        teacher.load_state_dict(student.state_dict())

        head_dim = cfg["experts"]["head_dim"]
        for name, x in experts.items():
            if expert_weights[name].patch > 0 and x.cls_dim != x.embed_dim:
                raise ConfigError(
                    f"experts.models.{name}: its CLS target (the model's embedding) is "
                    f"{x.cls_dim}-d but its patch tokens are {x.embed_dim}-d, and one head "
                    "serves both: set patch_weight: 0 (GPFM distils only CONCH's pooled "
                    "embedding) or cls_target: cls_token", key=f"experts.models.{name}")
        student["expert_heads"] = nn.ModuleDict(
            {name: ExpertHead(dim, x.cls_dim, head_dim) for name, x in experts.items()}
        )
        self.build_notes: list[str] = []
        if self.w["supervised"] > 0 and n_classes < 2:
            if cfg["supervised"]["require_labels"]:
                raise ConfigError(
                    f"supervised.weight > 0 needs >= 2 labelled classes (found {n_classes}): "
                    "tiles in class sub-folders, or slides with <slide>.geojson annotations "
                    "(data.annotations); or set supervised.require_labels=false",
                    key="supervised.weight", value=self.w["supervised"])
            self.w["supervised"] = 0.0
            self.build_notes.append(
                f"supervised.weight > 0 but the data hold {n_classes} labelled class(es) "
                "(supervised.require_labels is false): supervised term switched off")
        if self.w["supervised"] > 0:
            student["supervised_head"] = nn.Linear(dim, n_classes)

        self.student, self.teacher = student, teacher.requires_grad_(False)
        self.experts = nn.ModuleDict(experts)
        e = cfg["experts"]
        self.losses = nn.ModuleDict({
            "dino": DINOClsLoss(cfg["dino"]["n_prototypes"], cfg["dino"]["student_temp"],
                                cfg["dino"]["center_momentum"], cfg["teacher"]["centering"]),
            "ibot": IBOTPatchLoss(
                cfg["ibot" if separate_ibot else "dino"]["n_prototypes"],
                cfg["ibot"]["student_temp"], cfg["ibot"]["center_momentum"],
                cfg["teacher"]["centering"]),
            "koleo": KoLeoLoss(),
            "expert_cls": ExpertClsLoss(e["cls_loss"]),
            "expert_patch": ExpertPatchLoss(
                e["patch_cos_weight"], e["patch_smooth_l1_weight"], e["smooth_l1_beta"]),
            "supervised": SupervisedLoss(cfg["supervised"]["label_smoothing"]),
        })

    def train(self, mode: bool = True) -> DistillMetaArch:
        """Only the student trains; the teacher and experts stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        self.experts.eval()
        return self

    @torch.no_grad()
    def _teacher_targets(self, batch: Batch, teacher_temp: float) -> Batch:
        """Centred teacher probabilities (centres updated after use) and expert tokens."""
        logits = self.teacher(batch["global_crops"], batch["mask_indices"])
        targets: Batch = {}
        for key in ("dino", "ibot"):
            if key in logits:
                targets[key] = self.losses[key].teacher_probs(logits[key], teacher_temp)
                self.losses[key].update_center(logits[key])
        if "dino" in targets:
            targets["teacher_info"] = image_dependent_information(targets["dino"])
        for name, expert in self.experts.items():
            targets[f"expert_cls/{name}"], targets[f"expert_patch/{name}"] = expert.tokens(
                batch["global_crops"]
            )
        return targets

    def compute_losses(
        self,
        batch: Batch,
        teacher_temp: float,
        student: Callable[..., Batch] | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, every active term by name). ``student`` may be a DDP wrapper; the
        networks run under autocast when ``autocast_dtype`` is given (losses are fp32)."""
        device_type = batch["global_crops"].device.type
        with torch.autocast(device_type, autocast_dtype, enabled=autocast_dtype is not None):
            targets = self._teacher_targets(batch, teacher_temp)
            out = (student or self.student)(
                batch["global_crops"], batch["local_crops"], batch["masks"], batch["mask_indices"]
            )
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        if "dino" in targets:
            loss = self.losses["dino"](
                out["dino_global"], out.get("dino_local"), targets["dino"], N_GLOBAL_CROPS)
            terms["dino"] = (self.w["dino"], loss)
        if "ibot" in targets:
            loss = self.losses["ibot"](
                out["ibot"], targets["ibot"], batch["mask_weights"], len(batch["masks"]))
            terms["ibot"] = (self.w["ibot"], loss)
        if self.w["koleo"] > 0:
            crops = out["global_cls"].chunk(N_GLOBAL_CROPS)
            terms["koleo"] = (self.w["koleo"], sum(self.losses["koleo"](c) for c in crops))
        for name, weights in self.expert_weights.items():
            for kind, weight in (("cls", weights.cls), ("patch", weights.patch)):
                key = f"expert_{kind}/{name}"
                if weight > 0:
                    terms[key] = (weight, self.losses[f"expert_{kind}"](out[key], targets[key]))
        if "supervised" in out:
            loss = self.losses["supervised"](out["supervised"], batch["labels"])
            terms["supervised"] = (self.w["supervised"], loss)
        total = torch.stack([w * t for w, t in terms.values()]).sum()
        out_terms = {k: t for k, (_, t) in terms.items()}
        if "teacher_info" in targets:
            out_terms["teacher_info"] = targets["teacher_info"]
        return total, out_terms

    def forward_backward(
        self,
        batch: Batch,
        teacher_temp: float,
        student: Callable[..., Batch] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        loss_divisor: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch, backpropagated (divided by ``loss_divisor`` for gradient
        accumulation, scaled by ``scaler`` for fp16). Returns detached terms plus ``total``."""
        total, loss_dict = self.compute_losses(batch, teacher_temp, student, autocast_dtype)
        scaled = total / loss_divisor
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return {"total": total.detach(), **{k: v.detach() for k, v in loss_dict.items()}}

    def clip_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters clipped together under ``optim.clip_grad_scope: per_module``: each module
        of the student (backbone, DINO head, iBOT head, supervised head) on its own, expert
        heads not at all (DINOv2 clips ``student.values()``; GPFM keeps its distillation heads
        outside ``student``)."""
        return {key: [p for p in module.parameters() if p.requires_grad]
                for key, module in self.student.items() if key != "expert_heads"}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: θ_t ← m·θ_t + (1 - m)·θ_s for every module the teacher shares with the student."""
        for key in self.teacher:
            t_params = list(self.teacher[key].parameters())
            s_params = [p.detach() for p in self.student[key].parameters()]
            torch._foreach_mul_(t_params, momentum)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
