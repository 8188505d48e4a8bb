"""``open_slide``: pick the backend for a path and turn every failure into a clear message."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SlideOpenError
from .slide import Slide

# Extensions that are whole-slide images whatever their content (errors are ours to report).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".ome.tif", ".ome.tiff")
# Generic TIFFs: ours only when tiled or pyramidal (plain images are left to napari).
TIFF_SUFFIXES = (".tif", ".tiff")
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
DICOM_SUFFIXES = (".dcm",)


def slide_kind(path: str | Path) -> str | None:
    """'tiff', 'openslide', 'dicom' or None, from the name alone (cheap, never raises)."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        try:
            return "dicom" if any(f.suffix.lower() == ".dcm" for f in p.iterdir()) else None
        except OSError:
            return None
    if name.endswith(SLIDE_SUFFIXES) or name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(OPENSLIDE_SUFFIXES):
        return "openslide"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    return None


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    ``mpp`` overrides the file's pixel size (µm per level-0 pixel). Raises
    :class:`SlideOpenError` naming the file and the problem when it cannot be read.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideOpenError(p, "no such file or folder")
    if p.is_file() and os.path.getsize(p) == 0:
        raise SlideOpenError(p, "the file is empty (0 bytes)")
    kind = slide_kind(p)
    if kind is None:
        raise SlideOpenError(p, "not a whole-slide image format napari-gpfm reads")
    backend = _open_backend(p, kind)
    try:
        return Slide(backend, mpp=mpp)
    except Exception:
        backend.close()
        raise


def _open_backend(p: Path, kind: str):
    if kind == "dicom":
        from .backends.dicom import DicomBackend

        return DicomBackend(p)
    if kind == "openslide":
        from .backends.openslide import OpenSlideBackend

        return OpenSlideBackend(p)
    from .backends.tiff import TiffBackend

    try:
        return TiffBackend(p)
    except SlideOpenError as tiff_error:
        from .backends.openslide import OpenSlideBackend, openslide_available

        if not openslide_available() or "truncated" in tiff_error.problem:
            raise
        try:
            return OpenSlideBackend(p)
        except SlideOpenError:
            raise tiff_error from None
