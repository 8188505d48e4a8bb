"""'Finetune (distillation)' dock: launch a distillation run on the open slides, in the background.

The run itself is ``napari_gpfm.distill.iter_distillation`` (the same loop as
``napari-gpfm distill``); this widget only gathers the inputs, shows progress and loss, and asks
the run to stop (it saves a checkpoint; starting again resumes).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..layers.session import session_for
from ._jobs import JobPanel

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "distill" / "configs" / "experiments"


def run_overrides(slides: list[str], tiles: str, out_dir: str, steps: int, extra: str) -> list[str]:
    """The ``key=value`` overrides a run from this dock adds to its experiment config."""
    overrides = [f"data.slides={json.dumps(slides)}", f"output.dir={json.dumps(out_dir)}"]
    if tiles:
        overrides.append(f"data.tiles={json.dumps([tiles])}")
    if steps > 0:
        overrides.append(f"train.steps={steps}")
    overrides += extra.split()
    return overrides


class LossPlot(QWidget):
    """A small line plot of the total loss per step."""

    def __init__(self):
        super().__init__()
        self.values: list[float] = []
        self.setMinimumHeight(90)

    def add(self, value: float) -> None:
        self.values.append(value)
        self.update()

    def clear(self) -> None:
        self.values = []
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt name
        if len(self.values) < 2:
            return
        lo, hi = min(self.values), max(self.values)
        span = (hi - lo) or 1.0
        w, h = self.width() - 4, self.height() - 4
        n = len(self.values) - 1
        points = QPolygonF(
            [QPointF(2 + w * i / n, 2 + h * (1 - (v - lo) / span)) for i, v in enumerate(self.values)]
        )
        painter = QPainter(self)
        painter.setPen(QPen(QColor("#4fc3f7"), 1.5))
        painter.drawPolyline(points)
        painter.setPen(QColor("#aaaaaa"))
        painter.drawText(4, 14, f"{hi:.3f}")
        painter.drawText(4, self.height() - 4, f"{lo:.3f}")
        painter.end()


class DistillWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.stop_event = threading.Event()
        self.result = None

        self.config_combo = QComboBox()
        self.config_combo.addItems(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
        self.config_combo.setEditable(True)
        browse = QPushButton("…")
        browse.clicked.connect(self._browse_config)
        self.slide_list = QListWidget()
        self.tiles_edit = QLineEdit()
        self.tiles_edit.setPlaceholderText("optional folder of image tiles")
        self.out_edit = QLineEdit(str(Path.home() / "napari-gpfm-runs" / "finetune"))
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 10_000_000)
        self.steps_spin.setSpecialValueText("from config")
        self.extra_edit = QLineEdit()
        self.extra_edit.setPlaceholderText("more overrides, e.g. train.batch_size=8")
        self.start_button = QPushButton("Start")
        self.jobs = JobPanel("Finetune", self.session, [self.start_button])
        self.jobs.cancel_button.setText("Stop")
        self.jobs.cancel_button.clicked.disconnect()
        self.jobs.cancel_button.clicked.connect(self.stop)
        self.stop_button = self.jobs.cancel_button
        self.progress = self.jobs.bar
        self.status = self.jobs.status
        self.jobs.say("Pick slides and a config, then Start.")
        self.plot = LossPlot()

        config_row = QHBoxLayout()
        config_row.addWidget(self.config_combo, 1)
        config_row.addWidget(browse)
        form = QFormLayout()
        form.addRow("Config", config_row)
        form.addRow("Slides", self.slide_list)
        form.addRow("Tiles", self.tiles_edit)
        form.addRow("Output", self.out_edit)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Overrides", self.extra_edit)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.start_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.plot)

        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.session.events.slides.connect(self._update_slides)
        self._update_slides()

    # ------------------------------------------------------------------ inputs
    def _browse_config(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Distillation config", "", "YAML (*.yaml *.yml)")
        if path:
            self.config_combo.setEditText(path)

    def _update_slides(self, event=None) -> None:
        checked = set(self.selected_slides())
        self.slide_list.clear()
        for state in self.session.slides.values():
            slide = state.slide
            item = QListWidgetItem(state.name)
            item.setData(Qt.ItemDataRole.UserRole, str(slide.path))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            state = str(slide.path) in checked or not checked
            item.setCheckState(Qt.CheckState.Checked if state else Qt.CheckState.Unchecked)
            self.slide_list.addItem(item)

    def selected_slides(self) -> list[str]:
        items = (self.slide_list.item(i) for i in range(self.slide_list.count()))
        return [it.data(Qt.ItemDataRole.UserRole) for it in items if it.checkState() == Qt.CheckState.Checked]

    # ------------------------------------------------------------------ run
    @property
    def worker(self):
        return self.jobs.worker

    def start(self) -> None:
        from ..distill import load_config
        from ..jobs.distill import distill_job

        overrides = run_overrides(
            self.selected_slides(),
            self.tiles_edit.text().strip(),
            self.out_edit.text().strip(),
            self.steps_spin.value(),
            self.extra_edit.text(),
        )
        try:
            cfg = load_config(self.config_combo.currentText(), overrides)
        except (OSError, ValueError, KeyError) as exc:
            self.jobs.say(f"Config {self.config_combo.currentText()!r}: {exc}", True)
            return
        if not cfg["data"]["slides"] and not cfg["data"]["tiles"]:
            self.jobs.say("No data: tick at least one open slide or give a tiles folder.", True)
            return
        self.stop_event = threading.Event()
        self.result = None
        self.plot.clear()
        self.jobs.run(distill_job(cfg, self.stop_event), on_result=self._on_done,
                      message="Starting (building the model and data)…")  # fmt: skip
        self.jobs.worker.yielded.connect(self._on_step)

    def stop(self) -> None:
        """Ask the run to stop after the current step; it saves a checkpoint to resume from."""
        self.stop_event.set()
        self.stop_button.setEnabled(False)
        self.jobs.say("Stopping after this step (a checkpoint is saved)…")

    def _on_step(self, p) -> None:
        record = p.data
        if p.status != "running" or record is None or not hasattr(record, "losses"):
            return
        self.plot.add(record.losses["total"])
        terms = ", ".join(f"{k} {v:.3f}" for k, v in record.losses.items() if k != "total")
        self.jobs.say(
            f"step {record.step + 1}/{record.total_steps}: loss {record.losses['total']:.4f} "
            f"({terms}); {record.images_per_s:.1f} images/s"
        )

    def _on_done(self, result) -> None:
        self.result = result
        if result.finished and result.card_path is not None:
            self.jobs.say(f"Done: student saved as model '{Path(result.card_path).stem}' ({result.card_path}).")
        else:
            self.jobs.say(
                f"Stopped at step {result.next_step}/{result.total_steps}; checkpoint in "
                f"{result.output_dir}. Start again to resume."
            )
