"""GPFM distillation as a job over :func:`napari_gpfm.distill.iter_distillation`.

Records (``job="distill"``, ``stage="training"``, ``unit="steps"``, ``total`` = ``train.steps``):
``started`` before the model and data are built, ``running`` after every optimiser step
(``done`` = steps completed, counting a resumed run's earlier steps; ``data`` the
:class:`~napari_gpfm.distill.StepRecord`: ``losses`` dict with ``"total"``, ``schedule``,
``images_per_s``), and ``done`` at the end (``data`` the
:class:`~napari_gpfm.distill.DistillResult`, also the generator's return value: ``finished``,
``next_step``, ``checkpoint``, ``card_path``/``weights_path`` of the exported student).

Stopping: set ``stop_event``, or close the generator. Either way the current step completes,
a checkpoint is saved atomically (``checkpoints/step_<N>``, written under a temporary name and
renamed) and the run can be resumed by starting it again; nothing half-written is left and no
student is exported for an unfinished run.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .progress import Meter, Progress

__all__ = ["distill_job"]

JOB = "distill"
STAGE = "training"


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
) -> Generator[Progress, None, Any]:
    """Run a distillation; yields :class:`Progress`, returns the ``DistillResult``.

    ``config`` is a loaded config (``napari_gpfm.distill.load_config``), or an experiment
    name/path (``None``: the defaults) loaded with ``overrides`` (``key=value`` strings or a
    nested mapping, merged into a loaded config too). ``stop_event`` (a ``threading.Event``)
    stops the run after the current step with a checkpoint; closing the generator does the
    same.
    """
    from ..distill import iter_distillation

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
                record = next(steps)
            except StopIteration as end:
                result = end.value
                break
            done = record.step + 1
            if meter is None:  # rate over this run's steps (a resumed run starts later)
                meter = Meter(JOB, STAGE, record.total_steps, "steps", start_done=done)
            losses = record.losses
            terms = ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "total")
            msg = (f"step {done}/{record.total_steps}: loss {losses['total']:.4f}"
                   + (f" ({terms})" if terms else "") + f"; {record.images_per_s:.1f} images/s")
            yield meter.progress(done, "running", msg, record)
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
    yield Progress(JOB, STAGE, result.next_step, result.total_steps, eta_s=0.0, status="done",
                   unit="steps", message=_done_message(result), data=result)
    return result
