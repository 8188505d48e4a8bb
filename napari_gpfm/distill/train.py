"""The distillation loop, usable headless, from the CLI and under ``torchrun``.

:func:`iter_distillation` is a generator yielding one :class:`StepRecord` per optimiser step (its
cancel point) and returning a :class:`DistillResult`; :func:`run_distillation` drives it with an
optional ``threading.Event`` for stopping and an ``on_log`` callback, which is what a napari
widget runs in a worker thread. Everything random in step ``s`` on rank ``r`` is seeded from
``(seed, s, r)``, so resuming from a checkpoint reproduces an uninterrupted run exactly.

Before anything is built, the config is validated (:func:`~napari_gpfm.distill.config.validate`:
one ``ConfigError`` naming key, value and what is allowed), the experts' weights are looked up
(:func:`~napari_gpfm.distill.experts.resolve_experts`) and the checkpoint to resume from is
chosen (:func:`~napari_gpfm.distill.checkpoint.find_checkpoint`). What a run decides on its own
(a damaged ``LATEST`` worked around, an optional expert left out, an earlier run's checkpoints
moved aside) is a note: logged as a warning on the ``napari_gpfm.distill`` logger (the command
line prints it as ``note: ...``) and listed in ``DistillResult.notes``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .collapse import CollapseGuard
from .checkpoint import (
    find_checkpoint,
    is_complete,
    load_checkpoint,
    save_checkpoint,
    set_aside_later_checkpoints,
)
from .config import Config, bad_value, save_config, scaled_lr, validate
from .data import DataLayout, build_loader, derive_seed
from .distributed import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    env_from_environment,
    init_distributed,
)
from .experts import build_experts, resolve_experts
from .export import export_student
from .meta_arch import DIAGNOSTICS, DistillMetaArch
from .optim import apply_schedules, build_optimizer
from .runlog import RunLogger
from .schedules import Schedules, build_schedules
from .sources import ImageSource, build_source

INIT_STREAM = 0x696E6974  # "init": model and expert initialisation
STEP_STREAM = 0x73746570  # "step": drop-path and other in-model randomness
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("napari_gpfm.distill")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the run stopped without taking that optimiser step."""


@dataclass(frozen=True)
class StepRecord:
    """What one optimiser step did (averaged over micro-batches and processes)."""

    step: int
    total_steps: int
    losses: dict[str, float]
    schedule: dict[str, float]
    images_per_s: float
    elapsed_s: float
    #: Numbers that are not losses: ``teacher_info`` (nats; the collapse guard's measure).
    diagnostics: dict[str, float] = field(default_factory=dict)
    #: The collapse guard's warning, on the step it was raised.
    warning: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {"step": self.step, **self.schedule, **self.losses, **self.diagnostics,
                "images_per_s": self.images_per_s, "elapsed_s": self.elapsed_s}


@dataclass
class DistillResult:
    """Where a run ended and what it wrote."""

    output_dir: Path
    next_step: int
    total_steps: int
    finished: bool
    checkpoint: Path | None = None
    card_path: Path | None = None
    weights_path: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    #: What the run decided on its own (see the module docstring), in order.
    notes: list[str] = field(default_factory=list)


def resolve_device(cfg: Config, env: DistEnv) -> torch.device:
    """``train.device`` resolved like every job (:func:`napari_gpfm.encoders.device.
    resolve_device`: auto = CUDA when available), pinned to LOCAL_RANK's GPU."""
    from napari_gpfm.encoders.device import resolve_device as resolve

    dev = resolve(cfg["train"]["device"])
    if dev.type == "cuda" and dev.index is None:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return dev


def hardware_description(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    return f"{world_size} x CPU process ({platform.processor() or platform.machine()}, " \
           f"{os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def _sigint_sets(event: threading.Event) -> Iterator[None]:
    """In the main thread, Ctrl-C sets ``event`` (the loop then saves and stops)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class TrainingRun:
    """Everything a run holds (data source, model, optimizer, schedules, resume point).

    :func:`iter_distillation` drives it; benchmarks call :meth:`train_step` directly.
    """

    def __init__(self, cfg: Config) -> None:
        validate(cfg)  # one ConfigError naming key, value and what is allowed; nothing built yet
        self.cfg = cfg
        self.env = env_from_environment()
        self.notes: list[str] = []
        self.last_diagnostics: dict[str, float] = {}
        train = cfg["train"]
        self.out_dir = Path(cfg["output"]["dir"]).expanduser()
        expert_specs, expert_notes = resolve_experts(cfg)  # missing weights: refused here
        for note in expert_notes:
            self.note(note)
        resume_from = self._resume_from()
        self.device = resolve_device(cfg, self.env)
        init_distributed(self.device)
        torch.manual_seed(derive_seed(train["seed"], INIT_STREAM))
        self.source: ImageSource = build_source(cfg)
        experts, expert_weights = build_experts(cfg, self.device, expert_specs)
        self.meta = DistillMetaArch(cfg, experts, expert_weights, len(self.source.classes),
                                    load_init=resume_from is None)
        for note in self.meta.build_notes:
            self.note(note)
        if self.meta.init_report is not None:
            self.note(self.meta.init_report.message())
        elif cfg["student"]["init"] is not None:
            self.note(f"student.init ({cfg['student']['init']}) not read: resuming from "
                      f"{resume_from}, which holds the weights")
        self.meta.to(self.device).train()
        self.layout = DataLayout(
            train["batch_size"], train["accumulation_steps"], self.env.world_size, self.env.rank
        )
        freeze = cfg["schedules"]["freeze_last_layer_steps"]
        if freeze is None:
            freeze = math.ceil(len(self.source) / self.layout.global_batch)
        if freeze >= train["steps"] and cfg["dino"]["weight"] + cfg["ibot"]["weight"] > 0:
            self.note(f"schedules.freeze_last_layer_steps ({freeze}) >= train.steps "
                      f"({train['steps']}): the prototype layers stay frozen for the whole run; "
                      "set a smaller value for a short run")
        self.schedules: Schedules = build_schedules(
            cfg, scaled_lr(cfg, self.layout.global_batch), freeze
        )
        n_blocks = len(self.meta.student["backbone"].vit.blocks)
        self.optimizer = build_optimizer(self.meta.student, cfg, n_blocks)
        on_cuda = self.device.type == "cuda"
        self.autocast = AUTOCAST_DTYPES.get(train["precision"]) if on_cuda else None
        use_scaler = on_cuda and train["precision"] == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.start_step, self.wall_before = 0, 0.0
        self.checkpoint = resume_from
        if self.checkpoint is not None:
            self.start_step, extra = load_checkpoint(
                self.checkpoint, self.meta, self.optimizer, self.scaler
            )
            self.wall_before = extra.get("wall_time_s", 0.0)
        if train["resume"] is not True and self.env.is_main:
            self._set_aside_later()
        self.student = self.meta.student
        if self.env.world_size > 1:
            ids = [self.device.index] if on_cuda else None
            self.student = DistributedDataParallel(self.meta.student, device_ids=ids)

    def note(self, message: str) -> None:
        """Record what the run decided on its own; rank 0 logs it as a warning."""
        self.notes.append(message)
        if self.env.is_main:
            log.warning(message)

    def _resume_from(self) -> Path | None:
        """``train.resume``: an explicit checkpoint, the newest complete one in ``output.dir``
        (``true``; a damaged ``LATEST`` is worked around and noted) or none."""
        resume = self.cfg["train"]["resume"]
        if isinstance(resume, str):
            path = Path(resume).expanduser()
            if not is_complete(path):
                raise bad_value(
                    "train.resume", resume,
                    "true, false or a complete checkpoint directory (step_<N> holding "
                    "weights.safetensors, state.pt and config.yaml)",
                    "not a complete checkpoint" if path.is_dir() else "no such directory")
            return path
        if not resume:
            return None
        path, note = find_checkpoint(self.out_dir)
        if note:
            self.note(note)
        return path

    def _set_aside_later(self) -> None:
        """A run that does not continue the folder's newest checkpoint moves the later ones (an
        earlier run's) aside: pruning must not delete this run's, resuming must not pick them."""
        dest, moved = set_aside_later_checkpoints(self.out_dir, self.start_step, self.checkpoint)
        if moved:
            why = ("train.resume is false" if self.checkpoint is None
                   else f"resuming from {self.checkpoint}")
            self.note(f"{why}: moved {len(moved)} later checkpoint(s) of an earlier run in "
                      f"{self.out_dir} (newest {moved[-1].name}) to {dest}; delete that folder "
                      "when you no longer need them")

    def save(self, next_step: int, wall: float) -> Path | None:
        if not self.env.is_main:
            return None
        self.checkpoint = save_checkpoint(
            self.out_dir, next_step, self.meta, self.optimizer, self.scaler, self.cfg,
            self.cfg["train"]["keep_checkpoints"], {"wall_time_s": wall},
        )
        return self.checkpoint

    def train_step(self, step: int, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimiser step over ``accumulation_steps`` micro-batches; returns mean losses."""
        cfg, accum = self.cfg, self.layout.accumulation_steps
        torch.manual_seed(derive_seed(cfg["train"]["seed"], STEP_STREAM, step, self.env.rank))
        sched = self.schedules.at(step)
        apply_schedules(
            self.optimizer, sched["lr"], sched["weight_decay"], sched["last_layer_lr_factor"]
        )
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = _to_device(next(batches), self.device)
            sync = micro == accum - 1 or not isinstance(self.student, DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.student.no_sync():
                terms = self.meta.forward_backward(
                    batch, sched["teacher_temp"], self.student, self.scaler, accum, self.autocast
                )
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.float() / accum
        keys = list(sums)
        means = all_reduce_mean(torch.stack([sums[k] for k in keys])).tolist()
        losses = dict(zip(keys, means))
        self.last_diagnostics = {k: losses.pop(k) for k in DIAGNOSTICS if k in losses}
        if not math.isfinite(losses["total"]):
            raise NonFiniteLossError(f"non-finite loss at step {step}: {losses}")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.clip_gradients()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.meta.update_teacher(sched["momentum"])
        return losses

    def clip_gradients(self) -> None:
        """``optim.clip_grad`` per module (DINOv2/GPFM: backbone and each prototype head on its
        own, expert heads unclipped) or over every student parameter (``global``)."""
        limit = self.cfg["optim"]["clip_grad"]
        if limit <= 0:
            return
        if self.cfg["optim"]["clip_grad_scope"] == "global":
            params = [p for p in self.meta.student.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, limit)
            return
        for params in self.meta.clip_groups().values():
            if params:
                torch.nn.utils.clip_grad_norm_(params, limit)

    def should_stop(self, requested: bool) -> bool:
        """True on every process when any process was asked to stop."""
        flag = torch.tensor([float(requested)], device=self.device)
        return bool(all_reduce_sum(flag).item() > 0)

    def provenance(self, wall: float, last_losses: dict[str, float]) -> dict[str, Any]:
        import timm

        total = self.cfg["train"]["steps"]
        return {
            "method": "GPFM unified knowledge distillation (napari_gpfm.distill)",
            "data": self.source.describe(),
            "steps": total,
            "images_seen": total * self.layout.global_batch,
            "global_batch": self.layout.global_batch,
            "experts": sorted(self.meta.experts.keys()),
            "wall_time_s": round(wall, 1),
            "hardware": hardware_description(self.device, self.env.world_size),
            "precision": self.cfg["train"]["precision"] if self.autocast else "fp32",
            "final_losses": {k: round(v, 6) for k, v in last_losses.items()},
            **({"init": self.meta.init_report.provenance()}
               if self.meta.init_report is not None else {}),
            **({"trainable_blocks": self.cfg["student"]["trainable_blocks"]}
               if self.cfg["student"]["trainable_blocks"] is not None else {}),
            "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def iter_distillation(
    cfg: Config, stop_event: threading.Event | None = None
) -> Generator[StepRecord, None, DistillResult]:
    """Train; yield a :class:`StepRecord` per step; return a :class:`DistillResult`.

    Stops after the current step, saving a checkpoint, when ``stop_event`` is set or Ctrl-C is
    pressed (main thread only). A checkpoint is written every ``train.checkpoint_every`` steps
    and at exit; a run that completes ``train.steps`` exports the student to the models dir.
    """
    stop_event = stop_event or threading.Event()
    run = TrainingRun(cfg)
    total = cfg["train"]["steps"]
    if run.env.is_main:
        save_config(cfg, run.out_dir)
    main = run.env.is_main
    logger = RunLogger(run.out_dir, cfg["train"]["tensorboard"], run.start_step) if main else None
    bar = tqdm(total=total, initial=run.start_step, disable=not (main and cfg["train"]["progress"]))
    batches = iter(build_loader(cfg, run.source, run.meta.patch_size, run.layout, run.start_step))
    t0, step, losses = time.perf_counter(), run.start_step, {}
    guard = CollapseGuard()
    with _sigint_sets(stop_event):
        try:
            while step < total:
                tic = time.perf_counter()
                losses = run.train_step(step, batches)
                now = time.perf_counter()
                diagnostics = dict(run.last_diagnostics)
                warning = guard.update(step, diagnostics.get("teacher_info"))
                record = StepRecord(
                    step, total, losses, run.schedules.at(step),
                    run.layout.global_batch / (now - tic), run.wall_before + now - t0,
                    diagnostics, warning,
                )
                step += 1
                if logger is not None:
                    logger.log(record.as_row())
                if warning is not None:
                    run.note(warning)
                bar.update(1)
                postfix = {"loss": f"{losses['total']:.4f}"}
                if "teacher_info" in diagnostics:
                    postfix["info"] = f"{diagnostics['teacher_info']:.3f}"
                bar.set_postfix(postfix)
                yield record
                stopping = run.should_stop(stop_event.is_set())
                if stopping or step % cfg["train"]["checkpoint_every"] == 0 or step == total:
                    run.save(step, run.wall_before + time.perf_counter() - t0)
                if stopping:
                    break
        finally:
            bar.close()
            if logger is not None:
                logger.close()
    wall = run.wall_before + time.perf_counter() - t0
    result = DistillResult(
        run.out_dir, step, total, finished=step >= total, checkpoint=run.checkpoint,
        notes=list(run.notes),
    )
    if result.finished and main:
        result.provenance = run.provenance(wall, losses)
        result.card_path, result.weights_path = export_student(run.meta, cfg, result.provenance)
    return result


def run_distillation(
    cfg: Config,
    stop_event: threading.Event | None = None,
    on_log: Callable[[StepRecord], None] | None = None,
) -> DistillResult:
    """Run :func:`iter_distillation` to the end, passing each record to ``on_log``."""
    steps = iter_distillation(cfg, stop_event)
    while True:
        try:
            record = next(steps)
        except StopIteration as done:
            return done.value
        if on_log is not None:
            on_log(record)
