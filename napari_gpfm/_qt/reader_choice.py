"""napari-gpfm as napari's preferred reader for whole-slide files, offered once, in the docks.

napari asks which reader to use whenever two plugins can read a file, and preselects its own
builtin reader, which loads a whole level of a slide as plain pixels (no µm, and no dock sees
it). napari keeps the user's choice in its own setting,
``napari.settings.get_settings().plugins.extension2reader`` (File › Preferences › Plugins,
"File extension readers"); :func:`make_preferred` writes napari-gpfm there for the
extensions only whole-slide images use (:data:`WSI_EXTENSIONS`, both cases) and for DICOM
folders (napari keys folders by their path, so each known DICOM folder is added). A generic
``.tif`` stays napari's choice: napari-gpfm's reader claims only tiled or pyramidal TIFFs, and
napari asks for those.

The offer is made once: accepting writes napari's setting; declining is remembered in
``napari-gpfm-reader-choice.json`` beside napari's settings file (so tests that redirect
napari's settings redirect it too). :class:`ReaderChoicePanel` is the small panel the docks
show: the offer while it stands, and, for a slide layer another reader opened (an Image layer
whose ``source.path`` is a whole-slide image napari-gpfm did not open), how to reopen it, with a
button that does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

__all__ = [
    "PLUGIN",
    "WSI_EXTENSIONS",
    "ReaderChoicePanel",
    "answer",
    "foreign_slide_layers",
    "is_preferred",
    "make_preferred",
    "prefer_folders",
    "reader_choice_panel",
    "remember",
    "reopen_with_gpfm",
    "should_offer",
    "wsi_patterns",
]

PLUGIN = "napari-gpfm"
#: Extensions only whole-slide images use (``.tif`` is not one: napari keeps it).
WSI_EXTENSIONS = (".svs", ".ndpi", ".scn", ".mrxs", ".bif", ".vms", ".vmu", ".svslide", ".dcm")
ANSWER_FILE = "napari-gpfm-reader-choice.json"
ACCEPTED, DECLINED = "accepted", "declined"
_MEMORY: dict[str, str] = {}  # the answer when napari keeps no settings file

OFFER = ("napari opens whole-slide files ({exts}) with its own reader unless you pick "
         "napari-gpfm each time: pixels only, no µm, and no napari-gpfm dock can use them. "
         "Make napari-gpfm napari's reader for slides and DICOM folders? "
         "(Undo: File › Preferences › Plugins.)")  # fmt: skip
FOREIGN = ("{names} {verb} opened by {reader} as plain pixels (no µm; the napari-gpfm docks "
           "cannot use {it}). Reopen with napari-gpfm: the button below, or remove the layer "
           "and File › Open › napari-gpfm.")  # fmt: skip


# ------------------------------------------------------------------------------ napari's setting
def _settings() -> Any:
    from napari.settings import get_settings

    return get_settings()


def wsi_patterns() -> list[str]:
    """napari's file patterns for :data:`WSI_EXTENSIONS` (lower and upper case: napari
    matches its preferences case-sensitively)."""
    return [f"*{e}" for e in WSI_EXTENSIONS] + [f"*{e.upper()}" for e in WSI_EXTENSIONS]


def is_preferred() -> bool:
    """napari-gpfm is napari's reader for every whole-slide extension."""
    current = _settings().plugins.extension2reader
    return all(current.get(p) == PLUGIN for p in wsi_patterns())


def _folder_pattern(path: str | os.PathLike) -> str:
    """napari's preference key of a folder: its absolute path and a trailing separator."""
    return os.path.realpath(os.fspath(path)).rstrip(os.sep) + os.sep


def make_preferred(folders: Iterable[str | os.PathLike] = ()) -> None:
    """Write napari-gpfm into napari's ``extension2reader`` for the whole-slide extensions and
    these DICOM ``folders``; remember the answer."""
    settings = _settings()
    new = dict(settings.plugins.extension2reader)
    new.update({p: PLUGIN for p in wsi_patterns()})
    new.update({_folder_pattern(f): PLUGIN for f in _dicom(folders)})
    settings.plugins.extension2reader = new
    remember(ACCEPTED)


def prefer_folders(folders: Iterable[str | os.PathLike]) -> int:
    """Once napari-gpfm was accepted, make it the reader of these DICOM folders too (napari keys
    folders by path). Returns how many were added."""
    if answer() != ACCEPTED and not is_preferred():
        return 0
    settings = _settings()
    current = dict(settings.plugins.extension2reader)
    add = {_folder_pattern(f): PLUGIN for f in _dicom(folders)}
    add = {k: v for k, v in add.items() if current.get(k) != v}
    if add:
        settings.plugins.extension2reader = {**current, **add}
    return len(add)


def _dicom(paths: Iterable[str | os.PathLike]) -> list[str]:
    from ..slide import slide_kind

    return [os.fspath(p) for p in paths if Path(p).is_dir() and slide_kind(p) == "dicom"]


# ------------------------------------------------------------------------------ the answer
def _answer_path() -> Path | None:
    cfg = _settings().config_path
    return None if not cfg else Path(cfg).parent / ANSWER_FILE


def answer() -> str | None:
    """The user's answer to the offer: ``"accepted"``, ``"declined"`` or ``None`` (not asked)."""
    path = _answer_path()
    if path is None:
        return _MEMORY.get("answer")
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("answer")
    except (OSError, ValueError, AttributeError):
        return None
    return value if value in (ACCEPTED, DECLINED) else None


def remember(value: str) -> None:
    """Keep the answer (beside napari's settings file; in memory when napari keeps none)."""
    _MEMORY["answer"] = value
    path = _answer_path()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"answer": value}), encoding="utf-8")
        except OSError:
            pass  # read-only config folder: the answer lasts this session
    _hub().changed.emit()


def should_offer() -> bool:
    """The offer stands until answered (and never when napari-gpfm is already preferred)."""
    return answer() is None and not is_preferred()


# ------------------------------------------------------------------------------ other readers
def foreign_slide_layers(viewer: Any) -> list[Any]:
    """Image layers showing a whole-slide image that napari-gpfm's reader did not open."""
    from ..layers.reader import _is_ours, layer_slide

    out = []
    for la in viewer.layers:
        if type(la).__name__ != "Image" or layer_slide(la) is not None:
            continue
        src = getattr(la, "source", None)
        path = getattr(src, "path", None)
        if path and getattr(src, "reader_plugin", None) != PLUGIN and _is_ours(path):
            out.append(la)
    return out


def reopen_with_gpfm(viewer: Any, layer: Any) -> list[Any]:
    """Replace ``layer`` (and every layer opened from the same file) by the slide opened with
    napari-gpfm's reader, at the same place in the layer list; returns the new layers."""
    path = layer.source.path
    same = [la for la in foreign_slide_layers(viewer) if la.source.path == path]
    index = min(viewer.layers.index(la) for la in same)
    if Path(path).is_dir():
        prefer_folders([path])
    new = viewer.open(path, plugin=PLUGIN)
    for la in same:
        viewer.layers.remove(la)
    for i, la in enumerate(new):
        viewer.layers.move(viewer.layers.index(la), index + i)
    return new


# ------------------------------------------------------------------------------ the panel
class _Hub(QObject):
    changed = Signal()


_HUB: list[_Hub] = []


def _hub() -> _Hub:
    if not _HUB:
        _HUB.append(_Hub())
    return _HUB[0]


def _teardown(layers: Any, hub: _Hub, refresh: Any) -> Any:
    def run(*_: Any) -> None:
        for emitter in (layers.events.inserted, layers.events.removed):
            try:
                emitter.disconnect(refresh)
            except (RuntimeError, TypeError, ValueError):
                pass
        try:
            hub.changed.disconnect(refresh)
        except (RuntimeError, TypeError):
            pass

    return run


class ReaderChoicePanel(QWidget):
    """The offer (until answered) and the "opened by another reader" notice; hidden when it
    has nothing to say. ``viewer`` is the dock's (proxy of the) viewer."""

    def __init__(self, viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from ..layers.session import real_viewer

        self.viewer = real_viewer(viewer)
        self.offer_box = QFrame()
        self.offer_box.setFrameShape(QFrame.Shape.StyledPanel)
        self.offer_label = QLabel(OFFER.format(exts=" ".join(WSI_EXTENSIONS)))
        self.offer_label.setWordWrap(True)
        self.use_button = QPushButton("Use napari-gpfm for slides")
        self.use_button.setToolTip("Sets napari's own preference (File › Preferences › Plugins › "
                                   "File extension readers) for " + ", ".join(wsi_patterns()))
        self.decline_button = QPushButton("No thanks")
        row = QHBoxLayout()
        row.addWidget(self.use_button)
        row.addWidget(self.decline_button)
        row.addStretch(1)
        ol = QVBoxLayout(self.offer_box)
        ol.addWidget(self.offer_label)
        ol.addLayout(row)

        self.foreign_box = QFrame()
        self.foreign_box.setFrameShape(QFrame.Shape.StyledPanel)
        self.foreign_label = QLabel("")
        self.foreign_label.setWordWrap(True)
        self.reopen_button = QPushButton("Reopen with napari-gpfm")
        fl = QVBoxLayout(self.foreign_box)
        fl.addWidget(self.foreign_label)
        r2 = QHBoxLayout()
        r2.addWidget(self.reopen_button)
        r2.addStretch(1)
        fl.addLayout(r2)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.offer_box)
        lay.addWidget(self.foreign_box)

        self.use_button.clicked.connect(lambda: self.accept())
        self.decline_button.clicked.connect(lambda: self.decline())
        self.reopen_button.clicked.connect(lambda: self.reopen())
        layers = self.viewer.layers
        layers.events.inserted.connect(self.refresh)
        layers.events.removed.connect(self.refresh)
        hub = _hub()
        hub.changed.connect(self.refresh)
        self.destroyed.connect(_teardown(layers, hub, self.refresh))
        self.refresh()

    def refresh(self, event: Any = None) -> None:
        offer = should_offer()
        self.offer_box.setVisible(offer)
        foreign = foreign_slide_layers(self.viewer)
        if foreign:
            names = ", ".join(f"'{la.name}'" for la in foreign)
            readers = sorted({la.source.reader_plugin or "another reader" for la in foreign})
            reader = " / ".join("napari's builtin reader" if r == "napari" else r
                                for r in readers)  # fmt: skip
            many = len(foreign) > 1
            self.foreign_label.setText(FOREIGN.format(
                names=names, verb="were" if many else "was", reader=reader,
                it="them" if many else "it"))  # fmt: skip
            self.reopen_button.setText("Reopen them with napari-gpfm" if many
                                       else "Reopen with napari-gpfm")  # fmt: skip
        self.foreign_box.setVisible(bool(foreign))
        self.setVisible(offer or bool(foreign))

    def _known_dicom_folders(self) -> list[str]:
        from ..layers.session import session_for

        paths = [str(s.slide.path) for s in session_for(self.viewer).slides.values()]
        paths += [la.source.path for la in foreign_slide_layers(self.viewer)]
        return paths

    def accept(self) -> None:
        """Make napari-gpfm napari's reader for whole-slide files (and known DICOM folders)."""
        make_preferred(self._known_dicom_folders())
        from napari.utils.notifications import show_info

        show_info("napari-gpfm now opens whole-slide files (napari › Preferences › Plugins).")
        self.refresh()

    def decline(self) -> None:
        remember(DECLINED)
        self.refresh()

    def reopen(self) -> list[Any]:
        """Reopen every slide another reader opened with napari-gpfm; a failure is shown."""
        from napari.utils.notifications import show_error

        new: list[Any] = []
        for la in foreign_slide_layers(self.viewer):
            if la not in self.viewer.layers:
                continue  # gone with an earlier layer of the same file
            try:
                new += reopen_with_gpfm(self.viewer, la)
            except Exception as exc:  # noqa: BLE001 - shown; the layer stays
                show_error(f"{la.name}: napari-gpfm could not open {la.source.path}: {exc}")
        self.refresh()
        return new


def reader_choice_panel(viewer: Any) -> ReaderChoicePanel:
    """The panel a dock puts at its top: ``layout.insertWidget(0, reader_choice_panel(viewer))``."""
    return ReaderChoicePanel(viewer)
