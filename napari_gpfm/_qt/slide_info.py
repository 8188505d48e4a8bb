"""'Slide info' dock: metadata, pyramid levels, associated images and the mpp override."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..layers.reader import layer_slide, set_layer_mpp
from ..slide import MPP_RANGE, ImplausibleMppError

PREVIEW_SIDE = 240


def rgb_pixmap(image: np.ndarray, side: int = PREVIEW_SIDE) -> QPixmap:
    image = np.ascontiguousarray(image[..., :3])
    h, w = image.shape[:2]
    qimage = QImage(image.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(qimage).scaled(
        side, side, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
    )


class SlideInfoWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.layer_combo = QComboBox()
        self.fields = {k: QLabel("-") for k in ("file", "vendor", "size", "levels", "mpp", "objective")}
        for label in self.fields.values():
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(True)
        self.mpp_warning = QLabel()
        self.mpp_warning.setWordWrap(True)
        self.mpp_warning.setStyleSheet("color: #e0a000;")
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(*MPP_RANGE)
        self.mpp_spin.setSingleStep(0.01)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_button = QPushButton("Set pixel size")
        self.assoc_combo = QComboBox()
        self.assoc_preview = QLabel()
        self.assoc_preview.setMinimumHeight(PREVIEW_SIDE // 2)
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("filter properties")
        self.props = QTableWidget(0, 2)
        self.props.setHorizontalHeaderLabels(["property", "value"])
        self.props.horizontalHeader().setStretchLastSection(True)

        form = QFormLayout()
        form.addRow("Slide layer", self.layer_combo)
        for key, label in self.fields.items():
            form.addRow(key.capitalize(), label)
        mpp_row = QHBoxLayout()
        mpp_row.addWidget(self.mpp_spin)
        mpp_row.addWidget(self.mpp_button)
        form.addRow("Override", mpp_row)
        layout = QVBoxLayout(self)
        from .reader_choice import reader_choice_panel

        layout.addWidget(reader_choice_panel(napari_viewer))
        layout.addLayout(form)
        layout.addWidget(self.mpp_warning)
        layout.addWidget(QLabel("Associated images"))
        layout.addWidget(self.assoc_combo)
        layout.addWidget(self.assoc_preview)
        layout.addWidget(self.filter_edit)
        layout.addWidget(self.props)

        self.layer_combo.currentIndexChanged.connect(self.refresh)
        self.mpp_button.clicked.connect(self.apply_mpp)
        self.assoc_combo.currentTextChanged.connect(self.show_associated)
        self.filter_edit.textChanged.connect(self._fill_properties)
        self.viewer.layers.events.inserted.connect(self._update_layers)
        self.viewer.layers.events.removed.connect(self._update_layers)
        self._update_layers()

    # -------------------------------------------------------------- state
    def slide_layers(self) -> list:
        return [layer for layer in self.viewer.layers if layer_slide(layer) is not None]

    def current_layer(self):
        name = self.layer_combo.currentText()
        return next((la for la in self.slide_layers() if la.name == name), None)

    def _update_layers(self, event=None) -> None:
        current = self.layer_combo.currentText()
        names = [layer.name for layer in self.slide_layers()]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self.refresh()

    def refresh(self) -> None:
        layer = self.current_layer()
        slide = layer_slide(layer) if layer is not None else None
        if slide is None:
            for label in self.fields.values():
                label.setText("-")
            self.mpp_warning.setText("Open a whole-slide image to see its details.")
            self.assoc_combo.clear()
            self.props.setRowCount(0)
            return
        w, h = slide.dimensions
        self.fields["file"].setText(str(slide.path))
        self.fields["vendor"].setText(f"{slide.vendor} (read with {slide.backend.name})")
        self.fields["size"].setText(f"{w:,} × {h:,} px")
        levels = ", ".join(f"{lw}×{lh} (÷{ds:.2f})" for (lw, lh), ds in zip(slide.level_dimensions, slide.level_downsamples))
        self.fields["levels"].setText(levels + ("" if slide.has_native_pyramid else "  — no pyramid in the file"))
        if slide.mpp is None:
            self.fields["mpp"].setText("not recorded")
            self.mpp_warning.setText(
                "This slide does not record its pixel size, so it is shown in pixels and "
                "embeddings cannot be computed at an exact magnification. Enter the pixel size "
                "(µm/px) and press 'Set pixel size'."
            )
        else:
            source = "set by you" if slide.mpp_source == "user" else "from the file"
            self.fields["mpp"].setText(f"{slide.mpp:.4f} µm/px ({source})")
            self.mpp_warning.setText("")
            self.mpp_spin.setValue(slide.mpp)
        self.fields["objective"].setText(f"{slide.objective_power:g}×" if slide.objective_power else "not recorded")
        self.assoc_combo.blockSignals(True)
        self.assoc_combo.clear()
        self.assoc_combo.addItems(slide.associated_names)
        self.assoc_combo.blockSignals(False)
        self.show_associated(self.assoc_combo.currentText())
        self._fill_properties()

    def _fill_properties(self) -> None:
        layer = self.current_layer()
        slide = layer_slide(layer) if layer is not None else None
        items = sorted(slide.properties.items()) if slide else []
        needle = self.filter_edit.text().lower()
        items = [(k, v) for k, v in items if needle in k.lower() or needle in v.lower()]
        self.props.setRowCount(len(items))
        for row, (key, value) in enumerate(items):
            self.props.setItem(row, 0, QTableWidgetItem(key))
            self.props.setItem(row, 1, QTableWidgetItem(value))

    # -------------------------------------------------------------- actions
    def show_associated(self, name: str) -> None:
        layer = self.current_layer()
        slide = layer_slide(layer) if layer is not None else None
        if not name or slide is None:
            self.assoc_preview.clear()
            return
        self.assoc_preview.setPixmap(rgb_pixmap(slide.associated_image(name)))

    def apply_mpp(self) -> None:
        layer = self.current_layer()
        if layer is None:
            return
        try:
            set_layer_mpp(layer, float(self.mpp_spin.value()))
        except ImplausibleMppError as exc:
            self.mpp_warning.setText(str(exc))
            self.mpp_warning.setVisible(True)
            return
        self.refresh()
