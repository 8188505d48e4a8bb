"""DICOM WSI (a folder of instances, or one .dcm file of a series) via wsidicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlideOpenError, TileReadError
from .base import LevelInfo, SlideBackend, plausible_mpp, to_rgb


def dicom_files(path: Path) -> list[Path]:
    """The DICOM instances that make up the slide at ``path`` (a folder or one of its files)."""
    folder = path if path.is_dir() else path.parent
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())


class DicomBackend(SlideBackend):
    name = "wsidicom"

    def __init__(self, path: Path):
        super().__init__(path)
        from wsidicom import WsiDicom

        files = dicom_files(self.path)
        if not files:
            raise SlideOpenError(self.path, "no .dcm files found for a DICOM whole-slide image")
        try:
            self._wsi = WsiDicom.open(files)
        except Exception as exc:
            raise SlideOpenError(self.path, f"not a readable DICOM WSI ({exc})") from exc
        base = self._wsi.levels[0]
        base_w = base.size.width
        for level in self._wsi.levels:
            self.levels.append(
                LevelInfo(
                    int(level.size.width),
                    int(level.size.height),
                    int(level.tile_size.width),
                    int(level.tile_size.height),
                    float(base_w / level.size.width),
                )
            )
        self._level_ids = [lvl.level for lvl in self._wsi.levels]
        mpp = self._wsi.mpp
        self.mpp = plausible_mpp(getattr(mpp, "width", None))
        self.vendor = "dicom"
        meta = self._wsi.metadata
        equipment = getattr(meta, "equipment", None)
        self.properties = {
            "dicom.manufacturer": str(getattr(equipment, "manufacturer", "") or ""),
            "dicom.model_name": str(getattr(equipment, "model_name", "") or ""),
            "dicom.instances": str(len(files)),
        }

    def read_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        try:
            tile = np.asarray(self._wsi.read_tile(self._level_ids[level], (tx, ty)))
        except Exception as exc:
            raise TileReadError(self.path, level, tx, ty, str(exc)) from exc
        return to_rgb(tile)

    @property
    def associated_names(self) -> list[str]:
        names = []
        if self._wsi.labels:
            names.append("label")
        if self._wsi.overviews:
            names.append("macro")
        return names

    def associated_image(self, name: str) -> np.ndarray:
        if name == "label":
            return to_rgb(np.asarray(self._wsi.read_label().convert("RGB")))
        if name == "macro":
            return to_rgb(np.asarray(self._wsi.read_overview().convert("RGB")))
        raise KeyError(f"{self.path}: no associated image {name!r}")

    def close(self) -> None:
        self._wsi.close()
