"""The tiling controls (preset, target mpp, patch size, overlap, device, random weights) that
the GPFM and Project docks both show, and the ``GridSpec`` they describe."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QSpinBox

__all__ = ["CUSTOM", "DEVICES", "apply_preset", "build_tiling_controls", "mark_custom", "spec_of"]

CUSTOM = "custom"
DEVICES = ("auto", "cpu", "cuda")


def build_tiling_controls(dock: Any) -> None:
    """Give ``dock`` the widgets ``random_check``, ``preset_combo``, ``mpp_spin``, ``size_spin``,
    ``overlap_spin`` and ``device_combo`` (the dock lays them out)."""
    from ..tiles import PRESETS

    dock.random_check = QCheckBox("Random weights (testing)")
    dock.random_check.setToolTip("Allow a randomly initialised model when its weights are "
                                 "missing: for testing the workflow only.")  # fmt: skip
    dock.preset_combo = QComboBox()
    dock.preset_combo.addItems([*PRESETS, CUSTOM])
    dock.mpp_spin = QDoubleSpinBox()
    dock.mpp_spin.setRange(0.05, 20.0)
    dock.mpp_spin.setDecimals(3)
    dock.mpp_spin.setSingleStep(0.05)
    dock.mpp_spin.setSuffix(" µm/px")
    dock.size_spin = QSpinBox()
    dock.size_spin.setRange(16, 4096)
    dock.size_spin.setSuffix(" px")
    dock.overlap_spin = QSpinBox()
    dock.overlap_spin.setRange(0, 4095)
    dock.overlap_spin.setSuffix(" px")
    dock.device_combo = QComboBox()
    dock.device_combo.addItems(DEVICES)


def apply_preset(dock: Any, name: str) -> bool:
    """Show preset ``name``'s values in the spin boxes (no signals); False for "custom"."""
    from ..tiles import PRESETS

    if name not in PRESETS:
        return False
    spec = PRESETS[name]
    for spin, v in ((dock.mpp_spin, spec.target_mpp), (dock.size_spin, spec.patch_size),
                    (dock.overlap_spin, spec.overlap)):  # fmt: skip
        spin.blockSignals(True)
        spin.setValue(v)
        spin.blockSignals(False)
    return True


def mark_custom(dock: Any) -> None:
    """A value was edited by hand: the preset shows "custom" (no signal)."""
    if dock.preset_combo.currentText() != CUSTOM:
        dock.preset_combo.blockSignals(True)
        dock.preset_combo.setCurrentText(CUSTOM)
        dock.preset_combo.blockSignals(False)


def spec_of(dock: Any) -> Any:
    """The GridSpec the controls describe (a preset, or the custom values)."""
    from ..tiles import PRESETS, GridSpec

    name = dock.preset_combo.currentText()
    if name in PRESETS:
        return PRESETS[name]
    return GridSpec(target_mpp=dock.mpp_spin.value(), patch_size=dock.size_spin.value(),
                    overlap=dock.overlap_spin.value())  # fmt: skip
