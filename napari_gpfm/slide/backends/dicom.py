"""DICOM WSI via wsidicom: a folder holding one slide, or one file of a slide.

A slide is the VL Whole Slide Microscopy instances of one series (StudyInstanceUID +
SeriesInstanceUID): opening one file opens exactly that file's series, whatever else the folder
holds; opening a folder needs the folder to hold one series (else the message lists them and
asks for a file). Instances are found by the ``.dcm`` extension or, for files without it (DICOM
WG26 sets), by the ``DICM`` magic at byte 128. Optional metadata that wsidicom cannot parse
(e.g. highdicom's issuer type 'URI') is skipped with a :class:`SlideMetadataWarning` naming the
file; the pixels are read all the same.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import (
    DamagedSlideError,
    EmptySlideError,
    SlideMetadataWarning,
    SlideOpenError,
    TileReadError,
    UnsupportedSlideError,
)
from .base import LevelInfo, SlideBackend, pyramid_downsample, to_rgb

#: SOP Class UID of VL Whole Slide Microscopy Image Storage.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_HEADER_TAGS = ["SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "ImageType"]


def is_dicom_file(path: Path) -> bool:
    """``path`` is a file with the DICOM magic ``DICM`` at byte 128."""
    from ..open import is_dicom_file as _is

    return _is(path)


def dicom_files(path: Path) -> list[Path]:
    """The DICOM files of the folder ``path`` (or of the folder holding the file ``path``):
    ``*.dcm`` and files without that extension that carry the DICOM magic."""
    folder = path if path.is_dir() else path.parent
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix.lower() == ".dcm" or is_dicom_file(p))
    )


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_class: str
    study: str
    series: str

    @property
    def is_wsi(self) -> bool:
        return self.sop_class == WSI_SOP_CLASS

    @property
    def slide_key(self) -> tuple[str, str]:
        return (self.study, self.series)


def _read_header(path: Path) -> _Header:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    meta = getattr(ds, "file_meta", None)
    sop = str(
        ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "")
    )
    if not sop:
        raise ValueError("the header holds no SOP Class UID")
    study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    return _Header(path, sop, study, series)


def _damaged_file(files: list[Path]) -> tuple[Path, str] | None:
    """The first instance that pydicom cannot parse to its end (truncated, broken), and why."""
    import pydicom

    for f in files:
        try:
            ds = pydicom.dcmread(f, defer_size=1024)
            if "PixelData" not in ds and "FloatPixelData" not in ds:
                return f, "it holds no pixel data (truncated?)"
            ds.get("PixelData")  # reads the deferred value: fails when the file is cut short
        except Exception as exc:
            return f, f"{type(exc).__name__}: {exc}"
    return None


def _sop_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(uid).name
        return f"{name} ({uid})" if name and name != uid else uid or "no SOP class"
    except Exception:
        return uid or "no SOP class"


class DicomBackend(SlideBackend):
    name = "wsidicom"

    def __init__(self, path: Path):
        super().__init__(path)
        self.files = self._series_files()
        from wsidicom import WsiDicom

        try:
            self._wsi = WsiDicom.open(self.files)
        except Exception as exc:
            damaged = _damaged_file(self.files)
            if damaged is not None:
                raise DamagedSlideError(
                    damaged[0], f"the DICOM file is damaged or truncated ({damaged[1]}). Copy or "
                    "download it again.",
                ) from exc  # fmt: skip
            raise SlideOpenError(
                self.path, f"wsidicom cannot open the slide's {len(self.files)} DICOM file(s) "
                f"({type(exc).__name__}: {exc})",
            ) from exc  # fmt: skip
        try:
            self._read_structure()
        except Exception:
            self.close()
            raise

    # ------------------------------------------------------------------ which files
    def _series_files(self) -> list[Path]:
        """The instances of the slide at ``self.path``; sets :attr:`slide_name`."""
        folder = self.path if self.path.is_dir() else self.path.parent
        if self.path.is_file():
            try:
                own = _read_header(self.path)
            except Exception as exc:
                raise DamagedSlideError(
                    self.path, f"not a readable DICOM file ({type(exc).__name__}: {exc})"
                ) from exc
            if not own.is_wsi:
                raise UnsupportedSlideError(
                    self.path,
                    f"a DICOM file, but not a whole-slide microscopy image (SOP class "
                    f"{_sop_name(own.sop_class)}); napari-gpfm reads VL Whole Slide Microscopy "
                    "images.",
                )
        try:
            candidates = dicom_files(folder)
        except OSError as exc:
            raise SlideOpenError(folder, f"cannot list the folder ({exc})") from exc
        series: dict[tuple[str, str], list[Path]] = {}
        for f in candidates:
            try:
                header = _read_header(f)
            except Exception:  # another, broken file of the folder is not this slide's problem
                continue
            if header.is_wsi:
                series.setdefault(header.slide_key, []).append(f)
        if self.path.is_file():
            files = series.get(own.slide_key, [self.path])
            if self.path not in files:
                files = sorted([*files, self.path])
            others = len(series) - (own.slide_key in series)
            # one slide in the folder: TRIDENT-like folder name; several: the file's own name
            self.slide_name = folder.name if others == 0 else os.path.splitext(self.path.name)[0]
            return files
        if not series:
            if candidates:
                raise EmptySlideError(
                    self.path,
                    f"the folder holds {len(candidates)} DICOM file(s) but no whole-slide "
                    "microscopy image instance",
                )
            raise EmptySlideError(self.path, "the folder holds no DICOM files")
        if len(series) > 1:
            listing = "; ".join(
                f"{files[0].name} (series {key[1]}, {len(files)} file(s))"
                for key, files in sorted(series.items(), key=lambda kv: kv[1][0].name)
            )
            raise SlideOpenError(
                self.path,
                f"the folder holds {len(series)} DICOM slides: {listing}. Open one of its files "
                "to choose the slide.",
            )
        self.slide_name = self.path.name
        return next(iter(series.values()))

    # ------------------------------------------------------------------ structure
    def _read_structure(self) -> None:
        levels = list(self._wsi.levels)
        if not levels:
            raise EmptySlideError(self.path, "the DICOM series holds no pyramid level")
        base = (int(levels[0].size.width), int(levels[0].size.height))
        for i, level in enumerate(levels):
            size = (int(level.size.width), int(level.size.height))
            self.levels.append(
                LevelInfo(
                    size[0],
                    size[1],
                    int(level.tile_size.width),
                    int(level.tile_size.height),
                    1.0 if i == 0 else pyramid_downsample(base, size),
                )
            )
        self._level_ids = [lvl.level for lvl in levels]
        self.vendor = "dicom"
        mpp = self._optional("the pixel spacing", lambda: self._wsi.mpp)
        self.set_file_mpp((getattr(mpp, "width", None), "the DICOM pixel spacing"))
        self.properties = {"dicom.instances": str(len(self.files))}
        equipment = self._optional("the equipment metadata", lambda: self._wsi.metadata.equipment)
        if equipment is not None:
            for key in ("manufacturer", "model_name"):
                self.properties[f"dicom.{key}"] = str(getattr(equipment, key, "") or "")
        self._labels = bool(self._optional("the label image", lambda: self._wsi.labels))
        self._overviews = bool(self._optional("the overview image", lambda: self._wsi.overviews))

    def _optional(self, what: str, get):
        """A piece of optional metadata, or ``None`` with a warning naming the file."""
        try:
            return get()
        except Exception as exc:  # wsidicom's metadata schema raises ValueError, KeyError, ...
            warnings.warn(
                f"{self.path}: {what} could not be read and is skipped "
                f"({type(exc).__name__}: {exc}); the pixels are read all the same.",
                SlideMetadataWarning,
                stacklevel=3,
            )
            return None

    # ------------------------------------------------------------------ pixels
    def read_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        info = self.levels[level]
        try:
            tile = np.asarray(self._wsi.read_tile(self._level_ids[level], (tx, ty)))
        except Exception as exc:
            raise TileReadError(self.path, level, tx, ty, f"{type(exc).__name__}: {exc}") from exc
        x, y = tx * info.tile_width, ty * info.tile_height
        h, w = min(info.tile_height, info.height - y), min(info.tile_width, info.width - x)
        return to_rgb(tile[:h, :w])

    @property
    def associated_names(self) -> list[str]:
        names = []
        if self._labels:
            names.append("label")
        if self._overviews:
            names.append("macro")
        return names

    def associated_image(self, name: str) -> np.ndarray:
        if name == "label" and self._labels:
            return to_rgb(np.asarray(self._wsi.read_label().convert("RGB")))
        if name == "macro" and self._overviews:
            return to_rgb(np.asarray(self._wsi.read_overview().convert("RGB")))
        raise KeyError(f"{self.path}: no associated image {name!r}")

    def close(self) -> None:
        wsi = getattr(self, "_wsi", None)
        if wsi is not None:
            wsi.close()
