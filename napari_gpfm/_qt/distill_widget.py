"""'Finetune (distillation)' dock: launch a distillation run on the open slides, in the background.

The run itself is ``napari_gpfm.distill.iter_distillation`` (the same loop as
``napari-gpfm distill``) through :func:`napari_gpfm.jobs.distill.distill_job`; this widget
gathers the inputs, shows progress and loss, and asks the run to stop (it saves a checkpoint;
starting again resumes).

- **A readable name**, chosen before the start (default: the config's name and today's date):
  the exported student is registered under it, and the run lives in
  ``<runs folder>/<name>`` (so starting the same name again resumes that run).
- **Every model list at once**: when the student is exported the dock tells the session
  (``session.models_changed``), whose ``models`` event refreshes the model lists of the GPFM,
  PathoTune and Finetune docks; the dock lists the finetuned models of the user models folder.
- **The loss plot keeps its history across a resume**: the run's CSV log (``log.csv``) is read
  when it starts, and the new steps continue the curve.
- **Each config says what it is and how long it takes here**: the first comment line of its
  file, and steps × seconds per step (measured by an earlier run of this config on this
  machine, else the project's benchmark), for the steps still to run.
- **Start from a model**: "Start from" picks the config's own random start, any registry model
  (its architecture replaces the config's: ``student.init`` and ``--init`` of the command line)
  or a weights file; the teacher starts as a copy.
- **Collapse guard**: every step shows the teacher's image-dependent information (nats); when
  it stays near 0 the dock shows the run's warning in red and napari shows it as a notification.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from qtpy.QtCore import QPointF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..layers.session import session_for
from ._jobs import JobPanel, scrolling_layout, settle_width

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "distill" / "configs" / "experiments"
DEFAULT_RUNS_DIR = Path.home() / "napari-gpfm-runs" / "finetune"


RANDOM_START = "Random (as the config says)"
FILE_START = "Weights file…"


def run_overrides(slides: list[str], tiles: str, out_dir: str, steps: int, extra: str,
                  model_name: str | None = None, init: str | None = None) -> list[str]:  # fmt: skip
    """The ``key=value`` overrides a run from this dock adds to its experiment config
    (``init``: a registry model or weights file to start from; the typed overrides come last
    and win)."""
    overrides = [f"data.slides={json.dumps(slides)}", f"output.dir={json.dumps(out_dir)}"]
    if init:
        from ..distill.config import init_dotlist

        overrides += init_dotlist(init)
    if tiles:
        overrides.append(f"data.tiles={json.dumps([tiles])}")
    if steps > 0:
        overrides.append(f"train.steps={steps}")
    if model_name:
        overrides.append(f"output.model_name={json.dumps(model_name)}")
    overrides += extra.split()
    return overrides


class LossPlot(QWidget):
    """A small line plot of the total loss per step (``steps`` and ``values``)."""

    def __init__(self):
        super().__init__()
        self.steps: list[int] = []
        self.values: list[float] = []
        self.setMinimumHeight(90)

    def set_history(self, points: list[tuple[int, float]]) -> None:
        """Start from earlier steps of the run (``(step, loss)``, e.g. its CSV log)."""
        self.steps = [int(s) for s, _ in points]
        self.values = [float(v) for _, v in points]
        self.update()

    def add(self, value: float, step: int | None = None) -> None:
        """Append a step; points of a step at or after ``step`` (left by an interrupted run,
        whose log a resumed run rewrites) are dropped first."""
        if step is None:
            step = self.steps[-1] + 1 if self.steps else 0
        while self.steps and self.steps[-1] >= step:
            self.steps.pop()
            self.values.pop()
        self.steps.append(int(step))
        self.values.append(float(value))
        self.update()

    def clear(self) -> None:
        self.steps, self.values = [], []
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt name
        if len(self.values) < 2:
            return
        lo, hi = min(self.values), max(self.values)
        span = (hi - lo) or 1.0
        w, h = self.width() - 4, self.height() - 4
        s0, s1 = self.steps[0], self.steps[-1]
        n = (s1 - s0) or 1
        points = QPolygonF([QPointF(2 + w * (s - s0) / n, 2 + h * (1 - (v - lo) / span))
                            for s, v in zip(self.steps, self.values, strict=True)])
        painter = QPainter(self)
        painter.setPen(QPen(QColor("#4fc3f7"), 1.5))
        painter.drawPolyline(points)
        painter.setPen(QColor("#aaaaaa"))
        painter.drawText(4, 14, f"{hi:.3f}")
        painter.drawText(4, self.height() - 4, f"{lo:.3f}  (steps {s0 + 1}–{s1 + 1})")
        painter.end()


class DistillWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.stop_event = threading.Event()
        self.result = None
        self.collapse_warning = ""  # the collapse guard's warning of the current run
        self._auto_name = ""  # the default name shown (replaced when the config changes)
        self._names: set[str] = set()  # the registry's model names (refresh_models)

        self.config_combo = QComboBox()
        self.config_combo.addItems(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
        self.config_combo.setEditable(True)
        browse = QPushButton("…")
        browse.setFixedWidth(28)
        browse.clicked.connect(lambda: self._browse_config())
        self.config_info = QLabel("")
        self.config_info.setWordWrap(True)
        self.init_combo = QComboBox()
        self.init_combo.setToolTip(
            "Start the student (and its teacher, a copy) from a registry model, e.g. GPFM to "
            "continue its pretraining on your slides, or from a weights file; the model's "
            "architecture replaces the config's.")
        self.init_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.init_combo.setMinimumContentsLength(12)
        self.name_edit = QLineEdit()
        self.name_edit.setToolTip(
            "The finetuned model's name in every model list (lower case, letters, digits, "
            "'.', '_' or '-'). The run is kept in <runs folder>/<name>: start the same name "
            "again to resume it.")
        self.slide_list = QListWidget()
        self.slide_list.setMaximumHeight(110)
        self.tiles_edit = QLineEdit()
        self.tiles_edit.setPlaceholderText("optional folder of image tiles")
        self.out_edit = QLineEdit(str(DEFAULT_RUNS_DIR))
        self.out_edit.setToolTip("Runs folder: each run is kept in <runs folder>/<name>.")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 10_000_000)
        self.steps_spin.setSpecialValueText("from config")
        self.extra_edit = QLineEdit()
        self.extra_edit.setPlaceholderText("more overrides, e.g. train.batch_size=8")
        self.start_button = QPushButton("Start")
        self.jobs = JobPanel("Finetune", self.session, [self.start_button])
        self.jobs.cancel_button.setText("Stop")
        self.jobs.cancel_button.clicked.disconnect()
        self.jobs.cancel_button.clicked.connect(lambda: self.stop())
        self.stop_button = self.jobs.cancel_button
        self.progress = self.jobs.bar
        self.status = self.jobs.status
        self.jobs.say("Pick slides and a config, then Start.")
        self.plot = LossPlot()
        self.models_list = QListWidget()
        self.models_list.setMaximumHeight(90)
        self.models_list.setToolTip("Finetuned models in your models folder (every model list "
                                    "shows them: GPFM, PathoTune).")

        config_row = QHBoxLayout()
        config_row.addWidget(self.config_combo, 1)
        config_row.addWidget(browse)
        form = QFormLayout()
        form.addRow("Config", config_row)
        form.addRow(self.config_info)
        form.addRow("Start from", self.init_combo)
        form.addRow("Model name", self.name_edit)
        form.addRow("Slides", self.slide_list)
        form.addRow("Tiles", self.tiles_edit)
        form.addRow("Runs folder", self.out_edit)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Overrides", self.extra_edit)
        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addWidget(self.start_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.plot)
        layout.addWidget(QLabel("Finetuned models"))
        layout.addWidget(self.models_list)
        layout.addStretch(1)
        self.config_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.config_combo.setMinimumContentsLength(12)

        self.start_button.clicked.connect(lambda: self.start())
        self.config_combo.currentTextChanged.connect(lambda _: self._config_changed())
        self.init_combo.activated.connect(lambda _: self._init_chosen())
        self.steps_spin.valueChanged.connect(lambda _: self.update_info())
        self.extra_edit.editingFinished.connect(lambda: self.update_info())
        self.name_edit.editingFinished.connect(lambda: self.update_info())
        self.out_edit.editingFinished.connect(lambda: self.update_info())
        ev = self.session.events
        hooks = [(ev.slides, self._update_slides), (ev.models, self._models_changed)]
        for emitter, cb in hooks:
            emitter.connect(cb)
        self.destroyed.connect(_disconnect(hooks))
        self._update_slides()
        self._fill_init_choices()
        self._config_changed()
        self.refresh_models()
        settle_width(self)

    # ------------------------------------------------------------------ inputs
    def _browse_config(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Distillation config", "",
                                              "YAML (*.yaml *.yml)")  # fmt: skip
        if path:
            self.config_combo.setEditText(path)

    def _fill_init_choices(self) -> None:
        """Random, every registry model a student can start from, a file (kept selected)."""
        from ..jobs.distill import init_choices

        current = self.init_value()
        self.init_combo.blockSignals(True)
        self.init_combo.clear()
        self.init_combo.addItem(RANDOM_START, None)
        try:
            choices = init_choices()
        except Exception:  # noqa: BLE001 - a broken card must not break the dock
            choices = []
        for name, label in choices:
            self.init_combo.addItem(f"{name} — {label}", name)
        if current and self.init_combo.findData(current) < 0:
            self.init_combo.addItem(Path(current).name, current)
        self.init_combo.addItem(FILE_START, FILE_START)
        index = self.init_combo.findData(current) if current else 0
        self.init_combo.setCurrentIndex(max(index, 0))
        self.init_combo.blockSignals(False)

    def init_value(self) -> str | None:
        """The registry model or weights file chosen in "Start from" (None: random)."""
        value = self.init_combo.currentData()
        return None if value in (None, FILE_START) else str(value)

    def set_init(self, value: str | None) -> None:
        """Choose a registry model or a weights file (None: random) as the start."""
        if value is not None and self.init_combo.findData(value) < 0:
            self.init_combo.insertItem(self.init_combo.count() - 1, Path(value).name, value)
        self.init_combo.setCurrentIndex(max(self.init_combo.findData(value), 0)
                                        if value is not None else 0)
        self.update_info()

    def _init_chosen(self) -> None:
        if self.init_combo.currentData() == FILE_START:
            path, _ = QFileDialog.getOpenFileName(
                self, "Weights to start from", "",
                "Weights (*.pth *.pt *.bin *.safetensors);;All files (*)")
            self.set_init(path or None)
            return
        self.update_info()

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
        return [it.data(Qt.ItemDataRole.UserRole) for it in items
                if it.checkState() == Qt.CheckState.Checked]

    def model_name(self) -> str:
        """The name the student will be registered under (safe for the registry)."""
        from ..jobs.distill import safe_model_name

        return safe_model_name(self.name_edit.text())

    def run_dir(self) -> Path:
        """Where this run's checkpoints, config and log live: ``<runs folder>/<name>``."""
        return Path(self.out_edit.text().strip() or DEFAULT_RUNS_DIR).expanduser() / (
            self.model_name() or "run")

    def _config_changed(self) -> None:
        """A new config: a default name from it and today's date (unless the user typed one)."""
        from ..jobs.distill import default_model_name

        config = self.config_combo.currentText().strip()
        if config and (not self.name_edit.text() or self.name_edit.text() == self._auto_name):
            self._auto_name = default_model_name(config)
            self.name_edit.setText(self._auto_name)
        self.update_info()

    def _overrides(self) -> list[str]:
        return run_overrides(self.selected_slides(), self.tiles_edit.text().strip(),
                             str(self.run_dir()), self.steps_spin.value(),
                             self.extra_edit.text(), self.model_name() or None,
                             self.init_value())  # fmt: skip

    def update_info(self) -> None:
        """The config's one-line description and how long its steps still to run take here."""
        from ..jobs.distill import (
            config_description,
            estimate_duration,
            fmt_duration,
            loss_history,
            preview_config,
        )

        config = self.config_combo.currentText().strip()
        lines = []
        description = config_description(config) if config else ""
        if description:
            lines.append(description)
        try:
            cfg = preview_config(config, self._overrides())
        except (OSError, ValueError, KeyError) as exc:
            self.config_info.setText(f"{description}\n⚠ {exc}".strip())
            return
        steps = int(cfg["train"]["steps"])
        done = 0
        history = loss_history(self.run_dir()) if cfg["train"]["resume"] else []
        if history:
            done = min(history[-1][0] + 1, steps)
        todo = max(steps - done, 0)
        estimate = estimate_duration(config, cfg, todo)
        when = (" (duration unknown until a first run of this config on this machine)"
                if estimate is None else f" ≈ {fmt_duration(estimate[0])} ({estimate[1]})")
        resume = f", resuming at step {done + 1}" if done else ""
        lines.append(f"{todo:,} of {steps:,} steps to run{resume}{when}.")
        init = self.init_value()
        if init:
            lines.append(f"Student and teacher start from {init} "
                         f"({cfg['student']['arch']}).")
        name = self.model_name()
        if name and name in self._names:
            lines.append(f"A model named '{name}' exists: a finished run replaces it.")
        self.config_info.setText("\n".join(lines))

    # ------------------------------------------------------------------ models
    def _models_changed(self, event=None) -> None:
        """The session's ``models`` event: refresh on the next turn of the event loop (every
        dock's list refreshes on this event; not all in one go)."""
        QTimer.singleShot(0, self.refresh_models)

    def refresh_models(self, event=None) -> None:
        """The finetuned models of the user models folder (a new one appears at once)."""
        from ..encoders import list_cards
        from ..encoders.registry import user_models_dir

        user = user_models_dir().resolve()
        self.models_list.clear()
        try:
            cards = list_cards()
        except Exception:  # noqa: BLE001 - a broken card must not break the dock
            cards = []
        self._names = {c.name for c in cards}
        self._fill_init_choices()
        for card in cards:
            if card.path is None or card.path.parent.resolve() != user:
                continue
            method = str(card.provenance.get("method", ""))
            if "distillation" not in method:
                continue
            steps = card.provenance.get("steps")
            extra = f", {steps:,} steps" if isinstance(steps, int) else ""
            self.models_list.addItem(f"{card.name} — {card.display_name}{extra}")
        self.update_info()

    # ------------------------------------------------------------------ run
    @property
    def worker(self):
        return self.jobs.worker

    def start(self) -> None:
        """Start (or resume) the run. The config is only merged here; it is validated, which
        builds the student's meta model (0.1-0.2 s), in the job's worker: a bad value ends the
        job with the config named."""
        from ..jobs.distill import distill_job, loss_history, preview_config

        if self.jobs.busy:
            return
        name = self.model_name()
        if not name:
            self.jobs.say("Give the finetuned model a name (letters and digits).", True)
            return
        if name != self.name_edit.text():
            self.name_edit.setText(name)
        config = self.config_combo.currentText()
        overrides = self._overrides()
        try:
            cfg = preview_config(config, overrides)
        except (OSError, ValueError, KeyError) as exc:
            self.jobs.say(f"Config {config!r}: {exc}", True)
            return
        if not cfg["data"]["slides"] and not cfg["data"]["tiles"]:
            self.jobs.say("No data: tick at least one open slide or give a tiles folder.", True)
            return
        self.stop_event = threading.Event()
        self.result = None
        self.collapse_warning = ""
        self.plot.set_history(loss_history(self.run_dir()) if cfg["train"]["resume"] else [])
        resumed = f" (resuming at step {self.plot.steps[-1] + 2})" if self.plot.steps else ""

        def bad_config(exc: BaseException) -> bool | None:
            from ..distill.config import ConfigError

            if isinstance(exc, ConfigError):
                self.jobs.say(f"Config {config!r}: {exc}", True)
                _notify_error(f"Config {config!r}: {exc}")
                return True
            return None

        self.jobs.run(distill_job(config, self.stop_event, overrides, timing_key=config),
                      on_result=self._on_done, on_error=bad_config,
                      message=f"Starting {name}{resumed}: building the model and data…")
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
        from ..jobs.distill import step_message

        self.plot.add(record.losses["total"], record.step)
        if record.warning:
            self.collapse_warning = record.warning
            _notify_warning(record.warning)
        text = step_message(record)
        if self.collapse_warning and not record.warning:
            text += f"\n⚠ {self.collapse_warning}"
        self.jobs.say(text, error=bool(self.collapse_warning))

    def _on_done(self, result) -> None:
        self.result = result
        if result.finished and result.card_path is not None:
            name = Path(result.card_path).stem
            self.jobs.say(f"Done: student saved as model '{name}' ({result.card_path}); it is "
                          "in every model list now.")
            self.session.models_changed(name)  # GPFM, PathoTune and this dock refresh
        else:
            self.jobs.say(
                f"Stopped at step {result.next_step}/{result.total_steps}; checkpoint in "
                f"{result.output_dir}. Start again to resume."
            )
            self.update_info()


def _notify_error(text: str) -> None:
    from napari.utils.notifications import show_error

    show_error(text)


def _notify_warning(text: str) -> None:
    """A napari warning notification (the dock shows the text too)."""
    try:
        from napari.utils.notifications import show_warning
    except ImportError:  # pragma: no cover - napari is a dependency of the dock
        return
    show_warning(text)


def _disconnect(hooks: list[tuple[Any, Any]]):
    """A slot removing the dock's session callbacks once it is deleted (a closure)."""

    def run(*_: Any) -> None:
        for emitter, cb in hooks:
            try:
                emitter.disconnect(cb)
            except (RuntimeError, TypeError, ValueError):
                pass

    return run
