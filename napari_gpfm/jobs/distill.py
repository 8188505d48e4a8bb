"""GPFM distillation as a job over :func:`napari_gpfm.distill.iter_distillation`.

Records (``job="distill"``, ``stage="training"``, ``unit="steps"``, ``total`` = ``train.steps``):
``started`` before the model and data are built, ``running`` after every optimiser step
(``done`` = steps completed, counting a resumed run's earlier steps; ``data`` the
:class:`~napari_gpfm.distill.StepRecord`: ``losses`` dict with ``"total"``, ``schedule``,
``images_per_s``, ``diagnostics`` with the teacher's image-dependent information
``teacher_info`` and ``warning``, the collapse guard's warning on the step it fired, which the
message repeats after a ⚠), and ``done`` at the end (``data`` the
:class:`~napari_gpfm.distill.DistillResult`, also the generator's return value: ``finished``,
``next_step``, ``checkpoint``, ``card_path``/``weights_path`` of the exported student).

Stopping: set ``stop_event``, or close the generator. Either way the current step completes,
a checkpoint is saved atomically (``checkpoints/step_<N>``, written under a temporary name and
renamed) and the run can be resumed by starting it again; nothing half-written is left and no
student is exported for an unfinished run.

Helpers for a dock, all headless and free of torch: :func:`preview_config` (a config merged
without validation), :func:`config_description` (its file's first comment line),
:func:`loss_history` (a run's logged losses, to keep the plot across a resume),
:func:`estimate_duration` (steps × seconds per step on this machine: measured by earlier runs
of the same config, :func:`record_timing`, else the project's benchmark) and
:func:`default_model_name` (config + date).
"""

from __future__ import annotations

import csv
import datetime
import json
import re
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .pathotune import quiet_gc
from .progress import Meter, Progress

__all__ = ["config_description", "default_model_name", "distill_job", "estimate_duration",
           "init_choices", "loss_history", "preview_config", "record_timing", "step_message",
           "timings_path"]

JOB = "distill"
STAGE = "training"
TIMINGS_FILE = "finetune-timings.json"
#: Images per second of the bundled configs on the project's 2-core CPU machine
#: (``bench/bench_distill.py`` and the bundled student's run; README "Distillation training"),
#: used until a run on this machine has measured its own.
REFERENCE_IMAGES_PER_S = {"tiny_cpu": 229.0, "bundled_student": 5.4, "vits14_expert_uni": 0.72}
REFERENCE_WHERE = "the project's 2-core CPU benchmark"
NAME_RE = re.compile(r"[^a-z0-9._-]+")


# ------------------------------------------------------------------- configs and estimates
def config_key(config: Any) -> str:
    """A config's short name (an experiment name or a file's stem)."""
    return Path(str(config)).stem


def preview_config(config: Any, overrides: Sequence[str] = ()) -> dict:
    """Defaults <- experiment file <- ``overrides``, *not* validated (no data needed): what a
    dock shows before a run. Raises the config's errors (unknown file or key)."""
    import yaml

    from ..distill.config import load_defaults, merge, parse_dotlist, resolve_config_path

    cfg = load_defaults()
    file_cfg = yaml.safe_load(resolve_config_path(config).read_text()) or {}
    cfg = merge(cfg, file_cfg)
    if overrides:
        cfg = merge(cfg, parse_dotlist(list(overrides)))
    return cfg


def config_description(config: Any) -> str:
    """The first comment line of the config's file (its one-line description), or ``""``."""
    from ..distill.config import resolve_config_path

    try:
        text = resolve_config_path(config).read_text()
    except (OSError, ValueError):
        return ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("#").strip()
        if line and not line.startswith("#"):
            break
    return ""


def default_model_name(config: Any, day: datetime.date | None = None) -> str:
    """``<config>-<YYYY-MM-DD>``, lower-case, safe as a registry name and a file name."""
    day = day or datetime.date.today()
    return safe_model_name(f"{config_key(config)}-{day.isoformat()}")


def safe_model_name(name: str) -> str:
    """A registry name: lower case, letters, digits, ``. _ -`` (others become ``-``)."""
    return NAME_RE.sub("-", name.strip().lower()).strip("-.")


def timings_path() -> Path:
    """Where measured seconds per step are kept: beside the user models folder."""
    from ..encoders.registry import user_models_dir

    return user_models_dir().parent / TIMINGS_FILE


def _timing_key(config: Any, cfg: Mapping) -> str:
    t = cfg["train"]
    return f"{config_key(config)}|{t['device']}|{t['batch_size']}x{t['accumulation_steps']}"


def load_timings() -> dict:
    try:
        data = json.loads(timings_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_timing(config: Any, cfg: Mapping, s_per_step: float, startup_s: float) -> None:
    """Remember a run's measured seconds per step and start-up time for this config (the
    estimate shown before the next run); written atomically."""
    from ..analyses.export import atomic_path

    data = load_timings()
    data[_timing_key(config, cfg)] = {"s_per_step": round(float(s_per_step), 4),
                                      "startup_s": round(float(startup_s), 1),
                                      "when": datetime.datetime.now().isoformat(timespec="seconds")}
    path = timings_path()
    try:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(data, indent=1))
    except OSError:
        pass  # an estimate only


def estimate_duration(config: Any, cfg: Mapping, steps: int) -> tuple[float, str] | None:
    """(seconds, where the rate comes from) for ``steps`` steps of ``config`` on this machine:
    a run of this config measured here, else the project's benchmark for the bundled configs;
    ``None`` when neither is known."""
    measured = load_timings().get(_timing_key(config, cfg))
    if measured:
        return (measured["startup_s"] + steps * measured["s_per_step"],
                f"measured on this machine: {measured['s_per_step']:.3g} s/step")
    ref = REFERENCE_IMAGES_PER_S.get(config_key(config))
    if ref is None:
        return None
    t = cfg["train"]
    s_per_step = t["batch_size"] * t["accumulation_steps"] / ref
    return steps * s_per_step, f"{s_per_step:.3g} s/step from {REFERENCE_WHERE}"


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def init_choices() -> list[tuple[str, str]]:
    """(registry name, label) of the models a student can start from: every card whose
    architecture a student can keep (no LayerNorm epsilon override), weights present or not
    (the label says which; a missing file stops the run with how to get it)."""
    from ..encoders import list_cards

    out = []
    for card in list_cards():
        if card.architecture.norm_eps is not None:
            continue
        present = card.resolve_weights(None) is not None
        out.append((card.name, f"{card.display_name}" + ("" if present else " (no weights here)")))
    return out


def loss_history(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, total loss) of every step a run logged (``<run_dir>/log.csv``), in order."""
    from ..distill.runlog import LOG_FILE

    path = Path(run_dir).expanduser() / LOG_FILE
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error):
        return []
    out = []
    for row in rows:
        try:
            out.append((int(row["step"]), float(row["total"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def step_message(record: Any) -> str:
    """One step in words: loss and terms, the teacher's image-dependent information (the
    collapse guard's measure, nats), images/s, and the guard's warning when it fired."""
    losses = record.losses
    terms = ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "total")
    info = getattr(record, "diagnostics", {}).get("teacher_info")
    msg = (f"step {record.step + 1}/{record.total_steps}: loss {losses['total']:.4f}"
           + (f" ({terms})" if terms else "")
           + (f"; teacher info {info:.3f} nats" if info is not None else "")
           + f"; {record.images_per_s:.1f} images/s")
    warning = getattr(record, "warning", None)
    return f"{msg}\n⚠ {warning}" if warning else msg


def _config(config: Any, overrides: Sequence[str] | Mapping[str, Any] | None) -> dict:
    from ..distill.config import load_config, merge, parse_dotlist, validate

    if not isinstance(config, Mapping):
        return load_config(config, overrides or ())
    if not overrides:
        return config
    extra = overrides if isinstance(overrides, Mapping) else parse_dotlist(list(overrides))
    cfg = merge(config, extra)
    validate(cfg)
    return cfg


def _done_message(result: Any) -> str:
    if result.finished and result.card_path is not None:
        return (f"done: student saved as model '{Path(result.card_path).stem}' "
                f"({result.card_path})")
    if result.finished:
        return f"done: {result.next_step}/{result.total_steps} steps"
    return (f"stopped at step {result.next_step}/{result.total_steps}; checkpoint in "
            f"{result.output_dir} (start again to resume)")


def distill_job(
    config: Any,
    stop_event: threading.Event | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    timing_key: Any = None,
) -> Generator[Progress, None, Any]:
    """Run a distillation; yields :class:`Progress`, returns the ``DistillResult``.

    ``config`` is a loaded config (``napari_gpfm.distill.load_config``), or an experiment
    name/path (``None``: the defaults) loaded with ``overrides`` (``key=value`` strings or a
    nested mapping, merged into a loaded config too). ``stop_event`` (a ``threading.Event``)
    stops the run after the current step with a checkpoint; closing the generator does the
    same. With ``timing_key`` (the config's name) the run's measured seconds per step are
    remembered for :func:`estimate_duration` (runs of two or more steps). The model and data
    are built without garbage collections (:func:`~napari_gpfm.jobs.pathotune.quiet_gc`).
    """
    from ..distill import iter_distillation

    t_start = time.perf_counter()
    stamps: list[float] = []
    cfg = _config(config, overrides)
    stop_event = stop_event if stop_event is not None else threading.Event()
    total = int(cfg["train"]["steps"])
    yield Progress(JOB, STAGE, 0, total, status="started", unit="steps",
                   message="building the model and the data")
    steps = iter_distillation(cfg, stop_event)
    meter: Meter | None = None
    try:
        while True:
            try:
                if stamps:
                    record = next(steps)
                else:  # building the model and data: no full collections meanwhile
                    with quiet_gc():
                        record = next(steps)
            except StopIteration as end:
                result = end.value
                break
            done = record.step + 1
            stamps.append(time.perf_counter())
            if meter is None:  # rate over this run's steps (a resumed run starts later)
                meter = Meter(JOB, STAGE, record.total_steps, "steps", start_done=done)
            yield meter.progress(done, "running", step_message(record), record)
    except GeneratorExit:
        # closed at a record: let the loop finish its step, save a checkpoint and end
        stop_event.set()
        try:
            next(steps)  # saves, then ends (StopIteration) instead of yielding another step
        except StopIteration:
            pass
        raise
    finally:
        steps.close()
    if timing_key is not None and len(stamps) >= 2:
        s_per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        record_timing(timing_key, cfg, s_per_step, max(stamps[0] - t_start - s_per_step, 0.0))
    yield Progress(JOB, STAGE, result.next_step, result.total_steps, eta_s=0.0, status="done",
                   unit="steps", message=_done_message(result), data=result)
    return result
