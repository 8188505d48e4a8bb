"""Run logging on rank 0: one CSV row per logged step, plus TensorBoard scalars when installed."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

LOG_FILE = "log.csv"


class RunLogger:
    """Appends records to ``<dir>/log.csv`` (header fixed by the first record of the file).

    Rows at or after ``start_step`` left by an interrupted run are dropped, so a resumed run's
    log has each step once.
    """

    def __init__(self, directory: str | Path, tensorboard: bool, start_step: int = 0) -> None:
        self.path = Path(directory) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fields: list[str] | None = None
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open(newline="") as f:
                rows = list(csv.reader(f))
            self._fields = rows[0]
            kept = [r for r in rows[1:] if int(r[0]) < start_step]
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerows([self._fields, *kept])
        self._writer = _tensorboard_writer(Path(directory) / "tensorboard") if tensorboard else None

    def log(self, record: dict[str, Any]) -> None:
        if self._fields is None:
            self._fields = list(record)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self._fields)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self._fields, extrasaction="ignore").writerow(record)
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _tensorboard_writer(directory: Path) -> Any:
    """A SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))
