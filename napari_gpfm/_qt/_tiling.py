"""The tiling controls (preset, target mpp, patch size, overlap, device, precision, random
weights) that the GPFM and Project docks both show, and the ``GridSpec`` they describe."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QSpinBox

__all__ = [
    "CUSTOM",
    "DEVICES",
    "PRECISIONS",
    "apply_preset",
    "build_tiling_controls",
    "fill_model_combo",
    "model_label",
    "mark_custom",
    "show_card_tiling",
    "spec_of",
]

CUSTOM = "custom"
DEVICES = ("auto", "cpu", "cuda")
#: ``napari_gpfm.encoders.device.PRECISION_CHOICES`` (no torch import to build a dock).
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def build_tiling_controls(dock: Any) -> None:
    """Give ``dock`` the widgets ``random_check``, ``preset_combo``, ``mpp_spin``, ``size_spin``,
    ``overlap_spin``, ``device_combo`` and ``precision_combo`` (the dock lays them out)."""
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
    dock.precision_combo = QComboBox()
    dock.precision_combo.addItems(PRECISIONS)
    dock.precision_combo.setToolTip(
        "What the model computes in; part of the feature file's recipe, so a file made in "
        "another precision is not reused or resumed. auto: fp16 on a GPU (closest to fp32 at "
        "the speed of bf16), fp32 on the CPU.")  # fmt: skip


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


def model_label(card: Any) -> str:
    """Combo text: name, display name, whether weights are present, GPFM or not."""
    flag = "" if card.is_gpfm else " (not GPFM)"
    weights = "weights found" if card.status().found else "weights missing"
    return f"{card.name}{flag} — {card.display_name} [{weights}]"


def fill_model_combo(combo: Any) -> bool:
    """Fill a dock's model combo with the registry's cards (no signals), keeping the current
    choice, else the default model; returns whether the choice changed (a first fill, or the
    chosen model went away), when the dock shows the new card's tiling."""
    from ..encoders import default_model_name, list_cards

    current = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    for card in list_cards():
        combo.addItem(model_label(card), card.name)
    preferred = current or default_model_name()
    i = combo.findData(preferred) if preferred else -1
    combo.setCurrentIndex(max(i, 0))
    combo.blockSignals(False)
    return combo.currentData() != current


def show_card_tiling(dock: Any, card: Any) -> None:
    """Show the model card's recommended tiling: its preset when one matches (GPFM: the
    authors' gpfm-40x-512to224), else "custom" with its values (no signals)."""
    from ..tiles import PRESETS

    rec = getattr(card, "recommended_tiles", None)
    if rec is None:
        return
    name = next((n for n, p in PRESETS.items()
                 if (p.target_mpp, p.patch_size, p.overlap) == (rec.target_mpp, rec.patch_size, 0)),
                CUSTOM)  # fmt: skip
    dock.preset_combo.blockSignals(True)
    dock.preset_combo.setCurrentText(name)
    dock.preset_combo.blockSignals(False)
    if not apply_preset(dock, name):
        for spin, v in ((dock.mpp_spin, rec.target_mpp), (dock.size_spin, rec.patch_size),
                        (dock.overlap_spin, 0)):  # fmt: skip
            spin.blockSignals(True)
            spin.setValue(v)
            spin.blockSignals(False)


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
