"""One way every dock runs a long job: progress bar, stage and message, Cancel, errors.

:class:`JobPanel` runs a :mod:`napari_gpfm.jobs` generator in a thread worker and shows its
:class:`~napari_gpfm.jobs.Progress` records: a bar (busy while a stage has no total), the
stage and message, rate and time left. Cancel closes the generator at its next yield. Failures
end the job with the message in the panel and a napari notification; whatever happens, the
dock's buttons are enabled again when the job ends. A job tied to a slide is registered with
the session, so removing the slide layer cancels it.

While any job runs, Python makes no *full* garbage collection (:class:`JobGc`): a full
collection of a napari + torch heap holds the GIL for 0.5-1 s, and since a worker thread that
imports torch or builds a model triggers several, the window froze for that long (measured by
``bench/bench_stalls.py --trace``). Young collections go on; what is alive when the first job
starts and when the last one ends is frozen (``gc.freeze``), so later full collections skip
napari's, Qt's and torch's long-lived objects.

Every job first makes sure napari can paint a Labels layer without freezing the window
(:func:`warm_label_painting`, once per process, in the job's worker thread): with numba
installed (``umap-learn`` brings it), napari compiles its label-colour kernels the first time a
Labels layer with a direct colormap is shown, 1.5-2 s on the main thread, and the first Labels
layer also imports pandas, scikit-image and SciPy's linear algebra.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..layers import convert
from . import _workers

# colour bars of new result layers are built one event-loop turn after the layer (see convert)
convert.set_deferrer(lambda fn: QTimer.singleShot(0, fn))

__all__ = ["JobGc", "JobPanel", "fmt_time", "prefetch_torch_libraries", "start_warming",
           "warm_label_painting", "warmed"]


#: Modules napari imports when it adds its first Labels layer (0.3 s on the main thread).
LABELS_IMPORTS = ("pandas", "scipy.linalg", "skimage.color", "skimage.util")

_log = logging.getLogger(__name__)
_WARM_LOCK = threading.Lock()
_WARMED: list[bool] = []


def prefetch_torch_libraries() -> bool:
    """Load torch's native libraries (``libtorch_global_deps`` as torch loads it, then
    ``torch._C`` and what it links: libtorch_cpu, libtorch_cuda, CUDA) through libc's
    ``dlopen`` called with the GIL released, before anything imports torch. ``import torch``
    then finds them loaded: its own ``ctypes.CDLL`` and extension import hold the GIL while the
    dynamic loader relocates a gigabyte of code (0.25-0.8 s in one piece on a 2-core machine,
    the window frozen for as long), and now take milliseconds.

    Only where it changes nothing but the timing: Linux, torch not imported yet, no
    ``LD_LIBRARY_PATH`` (torch front-loads its CUDA wheels by path so that a CUDA of another
    path cannot win; without that variable the loader finds those same wheels through torch's
    RUNPATH) and no ``TORCH_USE_RTLD_GLOBAL``. Returns whether it loaded them."""
    if ("torch" in sys.modules or not sys.platform.startswith("linux")
            or os.environ.get("LD_LIBRARY_PATH") or os.environ.get("TORCH_USE_RTLD_GLOBAL")):
        return False
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    root = Path(spec.origin).parent
    deps = root / "lib" / "libtorch_global_deps.so"
    ext = next(iter(sorted(root.glob("_C.*.so"))), None)
    if not deps.is_file() or ext is None:
        return False
    dlopen = ctypes.CDLL(None).dlopen  # a foreign call: ctypes releases the GIL around it
    dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    if not dlopen(os.fsencode(deps), os.RTLD_NOW | os.RTLD_GLOBAL):
        return False
    return bool(dlopen(os.fsencode(ext), os.RTLD_NOW))


def warm_label_painting() -> None:
    """Compile napari's numba kernels that turn labels into texture values and build vispy's
    line dash patterns (the first Labels layer of a process otherwise freezes the window for
    seconds, the cost landing on the main thread), here in the calling (worker) thread; once per
    process, later calls return at once. Failures are ignored: napari then does it on first
    use, as without this."""
    with _WARM_LOCK:
        if _WARMED:
            return
        try:
            prefetch_torch_libraries()
        except Exception:  # noqa: BLE001 - an optimisation only: torch then loads them itself
            _log.debug("torch's libraries not prefetched", exc_info=True)
        try:
            from ..jobs.pathotune import quiet_gc

            with quiet_gc():
                import numpy as np
                from napari.utils.colormaps import DirectLabelColormap, label_colormap

                for module in LABELS_IMPORTS:
                    importlib.import_module(module)
                colours = {None: np.zeros(4), 0: np.zeros(4)}
                colours.update({i: np.array([1.0, 0.0, 0.0, 1.0]) for i in (1, 2, 3)})
                # result maps (up to 255 labels) and paint layers are uint8 with direct colours
                # (1-2 s to compile: numba does not cache its typed dicts on disk); a new Labels
                # layer of napari's is int32 with cyclic colours (cached on disk after the first
                # time). Maps of over 255 labels (uint16) still compile when first shown.
                for dtype, cmaps in ((np.uint8, (label_colormap(49),
                                                 DirectLabelColormap(color_dict=colours))),
                                     (np.int32, (label_colormap(49),))):
                    data = np.zeros((4, 4), dtype)
                    data[0, :3] = (1, 2, 3)
                    for cmap in cmaps:
                        cmap._data_to_texture(data)
                        cmap.map(data)
                from vispy.visuals.line.dash_atlas import DashAtlas

                DashAtlas()  # its patterns (cached per process) are built for every first line
        except Exception:  # noqa: BLE001 - an optimisation only: napari compiles on first use
            _log.debug("napari's label kernels not warmed", exc_info=True)
        _WARMED.append(True)


def warmed(job: Generator, name: str, imports: Sequence[str] = ()) -> Generator:
    """``job`` after :func:`warm_label_painting` (in the job's worker thread, saying so while
    it waits for it: the first time in a process only) and after importing ``imports`` without
    garbage collections (:func:`quiet_gc`)."""
    if not _WARMED:
        from ..jobs.progress import Progress

        yield Progress(name, "preparing", status="note",
                       message="loading torch and napari's class-map colours (once per "
                               "session)…")
        warm_label_painting()
    missing = [m for m in imports if m not in sys.modules]
    if missing:
        from ..jobs.pathotune import quiet_gc

        with quiet_gc():
            for module in missing:
                importlib.import_module(module)
    return (yield from job)


def start_warming() -> None:
    """:func:`warm_label_painting` in a daemon thread (when a dock opens)."""
    if not _WARMED:
        threading.Thread(target=warm_label_painting, name="napari-gpfm warm-up",
                         daemon=True).start()


class JobGc:
    """No full garbage collection while a job runs (process-wide, counted across panels).

    :meth:`enter` (first job) freezes the objects alive now and raises the third generation's
    threshold so that only young collections run; :meth:`leave` (last job) collects the young
    generations, freezes what survived (imported modules, built models: long-lived) and
    restores the threshold. Main thread only."""

    #: generation-1 collections between full ones while a job runs: in effect never
    HELD_THRESHOLD = 1 << 30
    running = 0
    _saved: tuple[int, int, int] | None = None

    @classmethod
    def enter(cls) -> None:
        if cls.running == 0:
            gc.freeze()
            cls._saved = gc.get_threshold()
            t0, t1, _ = cls._saved
            gc.set_threshold(t0, t1, cls.HELD_THRESHOLD)
        cls.running += 1

    @classmethod
    def leave(cls) -> None:
        if cls.running <= 0:
            return
        cls.running -= 1
        if cls.running == 0:
            gc.collect(1)
            gc.freeze()
            if cls._saved is not None:
                gc.set_threshold(*cls._saved)
            cls._saved = None


def _release(hold: list[bool]) -> None:
    """Give a panel's garbage-collection hold back, once."""
    if hold[0]:
        hold[0] = False
        JobGc.leave()


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def describe(p: Any) -> str:
    """One line for a Progress record: message (or stage), rate and time left."""
    text = p.message or f"{p.stage}…"
    if p.status == "running" and p.rate:
        unit = f" {p.unit}" if p.unit else ""
        text += f" · {p.rate:.1f}{unit}/s · {fmt_time(p.eta_s)} left"
    return text


class JobPanel(QWidget):
    """Progress bar + Cancel + status line; runs one job at a time.

    ``finished(outcome)`` is emitted on the main thread when a job ends, with outcome "done",
    "cancelled" or "error".
    """

    finished = Signal(str)

    #: at most one progress repaint per this many seconds: a progress bar repaints itself at
    #: once when its value changes, and in a window holding napari's OpenGL canvas every
    #: repaint composes the window again (tens of ms, hundreds on a loaded machine), so a job
    #: yielding many records a second kept the window busy (measured: ``bench_stalls.py``)
    MIN_PAINT_S = 0.2

    def __init__(self, title: str, session: Any = None, buttons: Sequence[QWidget] = ()):
        super().__init__()
        self.title = title
        self.session = session
        self.buttons = list(buttons)  # disabled while a job runs
        self.worker: Any = None
        self.last_progress: Any = None
        self.last_error: BaseException | None = None
        self.outcome: str | None = None
        self.cancel_latency_s: float | None = None
        self._cancel_t: float | None = None
        self._token: int | None = None
        self._gc_hold = [False]  # shared with the destroyed slot below
        hold = self._gc_hold
        # a panel deleted while its job runs (its dock closed) never sees ``finished``: give the
        # garbage-collection hold back then, or full collections stay off for the session
        self.destroyed.connect(lambda *_: _release(hold))
        self._pending: Any = None  # the newest record not shown yet
        self._painted_t = 0.0
        self._paint_timer = QTimer(self)
        self._paint_timer.setSingleShot(True)
        self._paint_timer.timeout.connect(self._show_pending)
        self._on_result: Callable[[Any], None] | None = None
        self._on_error: Callable[[BaseException], bool | None] | None = None

        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row)
        lay.addWidget(self.status)

    # ------------------------------------------------------------------ API
    @property
    def busy(self) -> bool:
        return self.worker is not None

    def say(self, text: str, error: bool = False) -> None:
        self.status.setStyleSheet("color: #ff6b6b;" if error else "")
        self.status.setText(text)

    def run(self, job: Generator | Callable[[], Generator], *,
            on_result: Callable[[Any], None] | None = None,
            on_error: Callable[[BaseException], bool | None] | None = None,
            slide: Any = None, message: str = "", imports: Sequence[str] = ()) -> Any:  # fmt: skip
        """Start ``job`` (a generator, or a function returning one) unless one is running,
        in the worker after :func:`warmed` (the session's warm-up, then ``imports``).

        ``on_result(value)`` gets the generator's return value on the main thread;
        ``on_error(exc)`` may handle an error (return True to suppress the standard message).
        ``slide`` (uid/layer) ties the job to a slide: removing it cancels the job."""
        if self.worker is not None:
            return None
        gen = warmed(job() if callable(job) else job, self.title, imports)
        self._on_result, self._on_error = on_result, on_error
        self.last_progress, self.last_error, self.outcome = None, None, None
        self._cancel_t = None
        self.worker = _workers.create_worker(
            _drive, gen, _worker_class=_workers.ClosingGeneratorWorker, _start_thread=False,
            _connect={"yielded": self._progress, "returned": self._returned,
                      "errored": self._errored, "aborted": self._aborted,
                      "finished": self._finished},
        )  # fmt: skip
        if slide is not None and self.session is not None:
            self._token = self.session.register_job(slide, self.cancel)
        self._set_running(True)
        JobGc.enter()
        self._gc_hold[0] = True
        self.bar.setRange(0, 0)  # busy until the first record with a total
        self.say(message or f"{self.title}…")
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        if self.worker is not None:
            self._cancel_t = time.perf_counter()
            self.say("Cancelling…")
            self.worker.quit()

    def wait(self, timeout_s: float = 60.0) -> str | None:
        """Block (processing Qt events) until the job ends; for scripts and tests."""
        from qtpy.QtWidgets import QApplication

        t0 = time.perf_counter()
        while self.worker is not None and time.perf_counter() - t0 < timeout_s:
            QApplication.processEvents()
            time.sleep(0.005)
        return self.outcome

    # ------------------------------------------------------------------ slots
    def _set_running(self, running: bool) -> None:
        for b in self.buttons:
            b.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _progress(self, p: Any) -> None:
        """A record from the worker: kept at once, shown at most every :data:`MIN_PAINT_S`."""
        self.last_progress = p
        self._pending = p
        if not self._paint_timer.isActive():
            wait = self.MIN_PAINT_S - (time.perf_counter() - self._painted_t)
            self._paint_timer.start(max(0, int(1000 * wait)))

    def _show_pending(self) -> None:
        p, self._pending = self._pending, None
        self._paint_timer.stop()
        if p is None:
            return
        self._painted_t = time.perf_counter()
        # QProgressBar.setValue repaints at once (synchronously); with updates off and on again
        # the repaint joins the window's next one instead
        self.bar.setUpdatesEnabled(False)
        try:
            if p.total > 0:
                self.bar.setRange(0, max(int(p.total), 1))
                self.bar.setValue(int(p.done))
                self.bar.setFormat(f"%v / %m {p.unit}".rstrip())
            else:
                self.bar.setRange(0, 0)
        finally:
            self.bar.setUpdatesEnabled(True)
        self.say(describe(p))

    def _returned(self, value: Any) -> None:
        self._show_pending()
        self.outcome = "done"
        p = self.last_progress
        if p is not None and p.total > 0:  # full: "total / total <unit>"
            self.bar.setRange(0, int(p.total))
            self.bar.setValue(int(p.total))
        else:
            self.bar.setRange(0, 1)
            self.bar.setValue(1)
            self.bar.setFormat("%p%")
        if self._on_result is not None:
            try:
                self._on_result(value)
            except Exception as exc:  # noqa: BLE001 - shown to the user, the dock stays usable
                self._errored(exc)

    def _errored(self, exc: BaseException) -> None:
        self._pending = None
        self._paint_timer.stop()
        exc = getattr(exc, "original", exc)
        self.outcome = "error"
        self.last_error = exc
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        if self._on_error is not None and self._on_error(exc):
            return
        message = str(exc) or type(exc).__name__
        self.say(message, error=True)
        show_error(f"{self.title}: {message}")

    def _aborted(self) -> None:
        self.outcome = "cancelled"

    def _finished(self) -> None:
        if self.outcome is None:
            self._show_pending()  # cancelled: the last record (what was kept) is shown below
        self._pending = None
        self._paint_timer.stop()  # a record still waiting must not paint over the last word
        self.worker = None
        _release(self._gc_hold)
        if self._token is not None and self.session is not None:
            self.session.job_done(self._token)
        self._token = None
        self._set_running(False)
        if self.outcome is None:
            self.outcome = "cancelled" if self._cancel_t is not None else "done"
        if self.outcome == "cancelled":
            self.cancel_latency_s = time.perf_counter() - (self._cancel_t or time.perf_counter())
            self.bar.setRange(0, 1)
            p = self.last_progress
            done = (f" ({p.done:,} / {p.total:,} {p.unit} kept; run again to resume)"
                    if p is not None and p.total and p.job == "embed" else "")  # fmt: skip
            self.say(f"Cancelled{done}.")
        self.finished.emit(self.outcome)


def tap(job: Generator, emit: Callable[[Any], None]) -> Generator:
    """``job``'s records, each also passed to ``emit`` (from the worker thread: a queued Qt
    signal reaches the main thread), and its return value; closing this closes ``job``."""
    try:
        while True:
            try:
                record = next(job)
            except StopIteration as stop:
                return stop.value
            emit(record)
            yield record
    finally:
        job.close()


class JobFailed(Exception):
    """Carries a job's exception through the worker (see :func:`_drive`)."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def _drive(gen: Generator) -> Generator:
    """Re-yield ``gen`` so that closing the worker's generator closes the job's too.

    superqt's generator worker takes any ``RuntimeError`` escaping the generator for "the
    worker was deleted" and ends silently, without ``errored`` or ``finished`` (a dock would
    wait forever): many real errors are RuntimeErrors (no tissue, CUDA unavailable, ...), so
    every exception travels wrapped in :class:`JobFailed` and is unwrapped on the main thread.
    """
    try:
        return (yield from gen)
    except Exception as exc:  # noqa: BLE001 - re-raised, wrapped, for the main thread
        raise JobFailed(exc) from exc
    finally:
        gen.close()


def scrolling_layout(dock: QWidget) -> QVBoxLayout:
    """The layout to fill for a dock whose content scrolls (a small screen never clips it)."""

    inner = QWidget()
    layout = QVBoxLayout(inner)
    fit_width(dock, wrap_in_scroll(dock, inner))
    return layout


def wrap_in_scroll(dock: QWidget, inner: QWidget) -> Any:
    """Put ``inner`` in a vertical scroll area filling ``dock``; returns the area."""
    from qtpy.QtWidgets import QFrame, QScrollArea

    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(inner)
    outer = QVBoxLayout(dock)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    dock.scroll = scroll
    return scroll


class _WidthKeeper(QObject):
    """Sets a dock's minimum width to its content's when the dock is shown (fonts and styles
    are final only then). Not on later layout changes: the canvas must not jump while the
    user works."""

    def __init__(self, dock: QWidget):
        super().__init__(dock)
        self.dock = dock

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt name
        if event.type() == QEvent.Type.Show:
            settle_width(self.dock)
        return False


def fit_width(dock: QWidget, scroll: Any) -> None:
    """Scroll vertically only, and never clip horizontally: the dock asks for the width its
    content needs (plus the scroll bar) when it is shown."""
    dock._width_scroll = scroll
    scroll.widget().installEventFilter(_WidthKeeper(dock))


def settle_width(dock: QWidget) -> None:
    """Call at the end of a dock's construction: minimum width = content + scroll bar."""
    scroll = getattr(dock, "_width_scroll", None)
    if scroll is None:
        return
    inner = scroll.widget()
    bar = scroll.verticalScrollBar().sizeHint().width()
    width = inner.minimumSizeHint().width() + bar + 4
    if dock.minimumWidth() != width:
        dock.setMinimumWidth(width)
