"""Reusable Qt pieces that tell a pathologist what is on screen: a tile gallery, a colour-bar
legend for a heatmap layer and a swatch legend for classes or clusters.

:class:`TileGallery` shows patches as thumbnails (read from the slide at the store's recipe by
:mod:`napari_gpfm.layers.gallery`, in a thread worker: the tiles appear at once with their
captions, the pictures a moment later), each with its score and slide name, a tooltip with slide,
patch index, coordinates and score, and a coloured frame for its cluster when it has one. A click
emits ``tile_clicked(uid, index)``; :func:`centre_on_patch` moves the viewer there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QPointF, QRectF, QSize, Qt, Signal
from qtpy.QtGui import QBrush, QColor, QIcon, QImage, QLinearGradient, QPainter, QPen, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..layers import convert
from ..layers.gallery import DEFAULT_SIZE, Tile, sources_for, thumbnails
from . import _workers

__all__ = ["ColourBarLegend", "SwatchLegend", "TileGallery", "centre_on_patch"]

FRAME = 3  # px of cluster colour around a thumbnail


def centre_on_patch(viewer: Any, session: Any, uid: int, index: int,
                    patches_across: float = 5.0) -> bool:  # fmt: skip
    """Centre the camera on patch ``index`` of slide ``uid`` with a few patch widths across the
    canvas, and show the slide layer; False when the slide is gone."""
    s = session.slides.get(int(uid))
    if s is None or not s.has_store or not 0 <= int(index) < s.n:
        return False
    canvas = tuple(viewer.canvas.size)
    centre, zoom = convert.camera_for_patch(s.coords[int(index)], s.patch_size_level0, s.mpp,
                                            canvas, patches_across, offset=s.offset)  # fmt: skip
    camera = viewer.scene.camera
    camera.center = centre
    camera.zoom = zoom
    if s.layer is not None:
        s.layer.visible = True
    return True


def range_text(lo: float, hi: float) -> tuple[str, str]:
    """The two ends of a value range with as few significant digits (3 or more) as tell them
    apart."""
    for digits in range(3, 10):
        a, b = f"{lo:.{digits}g}", f"{hi:.{digits}g}"
        if a != b or lo == hi:
            return a, b
    return a, b


def _rgb_hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(float(v) * 255):02x}" for v in list(rgb)[:3])


def _pixmap(image: np.ndarray | None, size: int, frame: Sequence[float] | None) -> QPixmap:
    """A thumbnail (or a grey placeholder) with an optional coloured frame."""
    if image is None:
        pm = QPixmap(size, size)
        pm.fill(QColor(70, 72, 78))
    else:
        img = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        h, w = img.shape[:2]
        qimg = QImage(img.tobytes(), w, h, 3 * w, QImage.Format.Format_RGB888).copy()
        pm = QPixmap.fromImage(qimg)
    if frame is not None:
        p = QPainter(pm)
        pen = QPen(QColor(_rgb_hex(frame)))
        pen.setWidth(FRAME * 2)  # half of a pen falls outside the pixmap
        p.setPen(pen)
        p.drawRect(0, 0, size, size)
        p.end()
    return pm


class TileGallery(QListWidget):
    """Thumbnails in a wrapping grid; ``tile_clicked(uid, index)`` on a click.

    ``set_tiles(tiles)`` shows the tiles at once (placeholders) and reads their pictures in a
    worker thread; ``loaded`` is emitted when they are in (``images`` then holds them, in
    order, exactly as read from the slide; ``load_seconds`` how long that took).
    """

    tile_clicked = Signal(object, int)  # uid (a Python int: layer uids exceed 64 bits), index
    loaded = Signal()

    def __init__(self, session: Any, size: int = DEFAULT_SIZE, rows: float = 2.0,
                 hide_when_empty: bool = True):  # fmt: skip
        super().__init__()
        self.session = session
        self.tile_size = int(size)
        self.tiles: list[Tile] = []
        self.images: np.ndarray | None = None
        self.load_seconds: float | None = None
        self.error: str | None = None
        self._hide_when_empty = hide_when_empty
        self._generation = 0
        self._t0 = 0.0
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setIconSize(QSize(self.tile_size, self.tile_size))
        line = self.fontMetrics().lineSpacing()
        # the caption: the score, then the name wrapped over up to two lines
        self.cell = QSize(max(self.tile_size + 14, 84), self.tile_size + 3 * line + 10)
        self.setGridSize(self.cell)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setMovement(QListView.Movement.Static)
        self.setWrapping(True)
        self.setUniformItemSizes(True)
        self.setWordWrap(True)
        self.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        frame = 2 * self.frameWidth() + 4
        self.setFixedHeight(int(rows * self.cell.height()) + frame)
        self.setMinimumWidth(self.cell.width() + self.verticalScrollBar().sizeHint().width()
                             + frame)  # fmt: skip
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.itemClicked.connect(self._clicked)
        self.setVisible(not hide_when_empty)

    # ------------------------------------------------------------------ API
    @property
    def ready(self) -> bool:
        """The pictures of the current tiles are in (or there are none)."""
        return self.images is not None or not self.tiles

    def rowCount(self) -> int:
        """Number of tiles (what ``QTableWidget.rowCount`` gave for the former hits table)."""
        return self.count()

    def set_tiles(self, tiles: Sequence[Tile]) -> None:
        """Show ``tiles`` now (placeholders, captions, tooltips) and read their pictures."""
        self._generation += 1
        gen = self._generation
        self.clear()
        self.tiles = list(tiles)
        self.images, self.load_seconds, self.error = None, None, None
        sources = sources_for(self.session, self.tiles)
        placeholder = QIcon(_pixmap(None, self.tile_size, None))
        for t in self.tiles:
            src = sources.get(t.uid)
            coord = None if src is None else src.coords[t.index]
            item = QListWidgetItem(placeholder, t.caption)
            item.setToolTip(t.tooltip(coord))
            item.setData(Qt.ItemDataRole.UserRole, (t.uid, t.index))
            item.setTextAlignment(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop)
            self.addItem(item)
        if self._hide_when_empty:
            self.setVisible(bool(self.tiles))
        if not self.tiles:
            self.loaded.emit()
            return
        self._t0 = time.perf_counter()
        _workers.start_function_worker(
            thumbnails, self.tiles, sources, self.tile_size,
            returned=lambda images, g=gen: self._images_in(g, images),
            errored=lambda exc, g=gen: self._failed(g, exc),
        )  # fmt: skip

    def wait(self, timeout_s: float = 30.0) -> bool:
        """Block (processing Qt events) until the pictures are in; for scripts and tests."""
        from qtpy.QtWidgets import QApplication

        t0 = time.perf_counter()
        while not self.ready and self.error is None and time.perf_counter() - t0 < timeout_s:
            QApplication.processEvents()
            time.sleep(0.002)
        return self.ready

    def item_rect(self, row: int):
        """The tile's rectangle in the viewport (where a user clicks)."""
        return self.visualItemRect(self.item(row))

    # ------------------------------------------------------------------ slots
    def _images_in(self, generation: int, images: np.ndarray) -> None:
        if generation != self._generation:
            return  # newer tiles were set meanwhile
        try:
            self._paint(images)
        except RuntimeError:  # the widget was deleted meanwhile
            return
        self.images = images
        self.load_seconds = time.perf_counter() - self._t0
        self.loaded.emit()

    def _paint(self, images: np.ndarray) -> None:
        for row, (t, img) in enumerate(zip(self.tiles, images)):
            frame = None
            if t.group is not None:
                frame = convert.cluster_colours(t.group + 1)[t.group]
            self.item(row).setIcon(QIcon(_pixmap(img, self.tile_size, frame)))

    def _failed(self, generation: int, exc: BaseException) -> None:
        if generation != self._generation:
            return
        self.error = str(exc) or type(exc).__name__
        try:
            self.setToolTip(f"Could not read the tiles: {self.error}")
        except RuntimeError:
            return
        self.loaded.emit()

    def _clicked(self, item: QListWidgetItem) -> None:
        uid, index = item.data(Qt.ItemDataRole.UserRole)
        self.tile_clicked.emit(int(uid), int(index))


class ColourBarLegend(QWidget):
    """What a heatmap layer's colours mean: its title, the colormap as a bar and the value
    range (the layer's contrast limits), following the layer's changes."""

    def __init__(self):
        super().__init__()
        self.layer: Any = None
        self.title = QLabel("")
        self.title.setWordWrap(True)
        self.bar = _GradientBar()
        self.lo_label = QLabel("")
        self.hi_label = QLabel("")
        self.hi_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.lo_label)
        row.addWidget(self.bar, 1)
        row.addWidget(self.hi_label)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addWidget(self.title)
        lay.addLayout(row)
        self.setVisible(False)

    @property
    def value_range(self) -> tuple[float, float] | None:
        return None if self.layer is None else tuple(float(v) for v in self.layer.contrast_limits)

    def set_layer(self, layer: Any, title: str | None = None) -> None:
        """Follow ``layer`` (an Image layer with a colormap), or nothing (``None``)."""
        if self.layer is not None:
            for name in ("contrast_limits", "colormap", "name"):
                getattr(self.layer.events, name).disconnect(self._update)
        self.layer = layer
        self._title = title
        if layer is not None:
            for name in ("contrast_limits", "colormap", "name"):
                getattr(layer.events, name).connect(self._update)
        self._update()

    def _update(self, event: Any = None) -> None:
        layer = self.layer
        self.setVisible(layer is not None)
        if layer is None:
            return
        lo, hi = self.value_range
        what = self._title or layer.metadata.get(convert.META_KEY, {}).get("value", "")
        self.title.setText(f"<b>{layer.name}</b>" + (f" — {what}" if what else ""))
        lo_text, hi_text = range_text(lo, hi)
        self.lo_label.setText(lo_text)
        self.hi_label.setText(hi_text)
        self.bar.colours = np.asarray(layer.colormap.map(np.linspace(0, 1, 32)))
        self.bar.setToolTip(f"{layer.colormap.name}: {lo:.4g} (left) to {hi:.4g} (right)")
        self.bar.update()


class _GradientBar(QWidget):
    def __init__(self):
        super().__init__()
        self.colours = np.zeros((2, 4))
        self.setMinimumSize(80, 14)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def paintEvent(self, event: Any) -> None:
        p = QPainter(self)
        r = QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5)
        grad = QLinearGradient(QPointF(r.left(), 0), QPointF(r.right(), 0))
        n = len(self.colours)
        for i, c in enumerate(self.colours):
            grad.setColorAt(i / max(n - 1, 1), QColor.fromRgbF(*(float(v) for v in c[:3])))
        p.fillRect(r, QBrush(grad))
        p.setPen(QPen(QColor(160, 160, 160)))
        p.drawRect(r)
        p.end()


class SwatchLegend(QLabel):
    """Class or cluster colours and names as coloured squares (wrapping).

    Always shown, one line tall at least, empty until it has entries: showing or hiding it
    relaid the dock out and resized the OpenGL plot beside it at once (a synchronous redraw,
    0.1 s on a 2-core machine, in the event-loop turn that delivered the results)."""

    def __init__(self):
        super().__init__()
        self.entries: list[tuple[str, np.ndarray]] = []
        self.setWordWrap(True)
        self.setTextFormat(Qt.TextFormat.RichText)
        self.setMinimumHeight(self.fontMetrics().height() + 6)

    def set_entries(self, entries: Sequence[tuple[str, Sequence[float]]]) -> None:
        self.entries = [(str(n), np.asarray(c, float)) for n, c in entries]
        self.setText("&nbsp;&nbsp; ".join(
            f'<span style="color:{_rgb_hex(c)}; font-size:large">■</span>&nbsp;{n}'
            for n, c in self.entries))  # fmt: skip
