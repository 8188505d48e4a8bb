"""The one progress record every long job yields (embed, cluster, probe, PathoTune, distill).

Jobs are plain generators in the core: ``gen = some_job(...)``; ``for p in gen`` gives
:class:`Progress` records and the generator's return value is the job's result. Closing the
generator cancels the job at its next yield. The docks run them in napari thread workers, the
CLI and the demo iterate them directly; nobody needs to know a job's private record types.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Progress", "Meter", "STATUSES"]

#: ``started`` before the first unit of work, ``running`` after each, ``done`` at the end,
#: ``skipped`` when the result already existed (nothing computed), ``note`` for a message
#: without progress (e.g. "model loaded").
STATUSES = ("started", "running", "done", "skipped", "note")


@dataclass(frozen=True)
class Progress:
    """Progress of one job.

    Attributes:
        job: which job ("embed", "cluster", "probe", "pathotune", "distill", ...).
        stage: what it is doing now, in words a user understands ("loading model",
            "detecting tissue", "embedding", "training", "predicting", ...).
        done: units of work done (patches, steps, ...); ``total`` 0 means indeterminate.
        total: units of work in this stage.
        rate: units per second in this run (``None`` before the first unit).
        eta_s: seconds left at the current rate (``None`` when unknown).
        status: one of :data:`STATUSES`.
        message: a one-line human-readable summary.
        unit: what ``done``/``total`` count ("patches", "steps", "epochs").
        data: job-specific payload (e.g. the loss dict of a distillation step, the live probe's
            report); plain data, never a widget.
    """

    job: str
    stage: str
    done: int = 0
    total: int = 0
    rate: float | None = None
    eta_s: float | None = None
    status: str = "running"
    message: str = ""
    unit: str = ""
    data: Any = field(default=None, compare=False)

    @property
    def fraction(self) -> float | None:
        """``done / total`` in 0..1, ``None`` when indeterminate."""
        if self.total <= 0:
            return None
        return min(1.0, max(0.0, self.done / self.total))

    def with_(self, **changes: Any) -> Progress:
        return replace(self, **changes)


class Meter:
    """Rate and ETA for a stage: ``meter.progress(done, message=...)`` builds a record."""

    def __init__(self, job: str, stage: str, total: int, unit: str = "", start_done: int = 0):
        self.job, self.stage, self.total, self.unit = job, stage, int(total), unit
        self.start_done = int(start_done)
        self.t0 = time.perf_counter()

    def progress(self, done: int, status: str = "running", message: str = "",
                 data: Any = None) -> Progress:  # fmt: skip
        elapsed = time.perf_counter() - self.t0
        ran = int(done) - self.start_done
        rate = ran / elapsed if ran > 0 and elapsed > 0 else None
        eta = (self.total - int(done)) / rate if rate and self.total else None
        return Progress(self.job, self.stage, int(done), self.total, rate, eta, status,
                        message, self.unit, data)  # fmt: skip
