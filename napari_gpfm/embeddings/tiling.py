"""Tilings that depend on the slide: a fixed level-0 pixel count, as GPFM's authors' scripts cut.

A :class:`~napari_gpfm.tiles.GridSpec` is physical (``patch_size`` pixels at ``target_mpp``), so
the same spec cuts the same field of view from every slide. GPFM's authors cut 512 px at level 0
of their 40× scans and resized to 224, whatever the exact mpp: 129.4 µm on a 0.2527 µm/px scan,
128 µm at 0.25. :class:`Level0Tiling` reproduces that literally; resolved against a slide
(:func:`spec_for_slide`) it becomes the GridSpec ``size0`` px at the slide's own mpp, so its
store lives in e.g. ``0.2527mpp_512px_0px_overlap`` and its recipe records the exact field.

Which preset reproduces what:

- the GPFM card's default (``recommended_tiles``: 512 px at 0.25 µm/px → 224, a 128 µm field by
  exact mpp; the ``gpfm-40x-512to224`` preset): GPFM's paper (Ma et al. 2025), its field of view
  on any scan;
- ``Level0Tiling(512)`` (CLI ``--level0-px 512``): the authors' extraction scripts literally
  (512 level-0 px on a 40× scan; 256 on a 20× one reproduces their 20× setting);
- ``gpfm-20x-224`` (224 px at 0.5 µm/px, 112 µm, fed as is): TRIDENT's GPFM extraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from napari_gpfm.slide.errors import MissingMppError
from napari_gpfm.tiles.grid import GridSpec

__all__ = ["Level0Tiling", "spec_for_slide"]


@dataclass(frozen=True)
class Level0Tiling:
    """Patches of ``size0`` level-0 pixels (overlap ``overlap0`` level-0 pixels), whatever the
    slide's mpp; resized to the model's input size like any patch."""

    size0: int = 512
    overlap0: int = 0
    min_tissue: float = 0.5

    def __post_init__(self) -> None:
        if self.size0 < 1:
            raise ValueError(f"the level-0 patch size must be >= 1 px, got {self.size0}")
        if not 0 <= self.overlap0 < self.size0:
            raise ValueError(f"overlap must be in [0, {self.size0}) level-0 px, got "
                             f"{self.overlap0}")  # fmt: skip

    def for_slide(self, slide: Any) -> GridSpec:
        """The GridSpec of this tiling on ``slide``: ``size0`` px at the slide's exact mpp."""
        mpp = getattr(slide, "mpp", None)
        if mpp is None:
            raise MissingMppError(slide.path, "recording the field of view of level-0 patches",
                                  getattr(slide, "mpp_note", None))  # fmt: skip
        return GridSpec(target_mpp=float(mpp), patch_size=int(self.size0),
                        overlap=int(self.overlap0), min_tissue=float(self.min_tissue))  # fmt: skip

    def describe(self) -> str:
        return f"{self.size0} px at level 0 (the slide's own mpp)"


def spec_for_slide(spec: Any, slide: Any) -> Any:
    """``spec`` resolved against ``slide`` (a :class:`Level0Tiling` becomes a GridSpec; a
    GridSpec is returned as is)."""
    if isinstance(spec, Level0Tiling):
        return spec.for_slide(slide)
    return spec
