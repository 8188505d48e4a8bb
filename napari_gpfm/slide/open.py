"""``open_slide``: pick the backend for a path and turn every failure into a clear message.

Failures are one of :class:`~napari_gpfm.slide.UnsupportedSlideError` (an intact file of a kind
napari-gpfm does not read: the message says what is supported),
:class:`~napari_gpfm.slide.DamagedSlideError` (truncated, broken structure, not the format its
name claims) or :class:`~napari_gpfm.slide.EmptySlideError` (0 bytes, no image in the folder),
all :class:`~napari_gpfm.slide.SlideOpenError`; every message names the file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import EmptySlideError, SlideOpenError, UnsupportedSlideError
from .mpp import validate_mpp
from .slide import Slide

MPP_GIVEN = "given with --mpp or open_slide(mpp=...)"

# Extensions that are whole-slide images whatever their content (errors are ours to report).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".qptiff")
# Generic TIFFs (OME-TIFF included): ours only when tiled or pyramidal (plain images are left
# to napari).
TIFF_SUFFIXES = (".tif", ".tiff")
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
DICOM_SUFFIXES = (".dcm",)
#: Every file suffix (``Path.suffix``, lower case) napari-gpfm opens as a slide: the one list.
#: napari.yaml's reader ``filename_patterns`` are these as ``*<suffix>`` (a test compares them);
#: a folder, or a file without a known suffix, is a slide only when it holds DICOM.
READER_SUFFIXES = SLIDE_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES + DICOM_SUFFIXES
#: Files of a folder probed for the DICOM magic when none is named ``*.dcm``.
DICOM_PROBE_FILES = 64

SUPPORTED = (
    "Aperio .svs, Hamamatsu .ndpi, Leica .scn, Ventana .bif, .qptiff, OME-TIFF, tiled or "
    "pyramidal .tif/.tiff, DICOM whole-slide images (a folder, or one of its files, with or "
    "without the .dcm extension), and with OpenSlide installed MIRAX .mrxs, Hamamatsu .vms/.vmu "
    "and Sakura .svslide"
)


def is_dicom_file(path: str | Path) -> bool:
    """True when ``path`` is a file holding the DICOM magic ``DICM`` at byte 128 (DICOM Part 10),
    whatever its name (WG26 sets publish instances without extension)."""
    try:
        if not Path(path).is_file():  # never open a folder, a pipe or a device
            return False
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def special_file_kind(path: str | Path) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder (after following
    symbolic links): "a named pipe (FIFO)", "a character device", ...; ``None`` for a regular
    file, a folder or a path that does not exist. Never opens the path."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _folder_has_dicom(folder: Path) -> bool:
    probed = 0
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in DICOM_SUFFIXES:
            return True
        if f.is_file() and probed < DICOM_PROBE_FILES:
            probed += 1
            if is_dicom_file(f):
                return True
    return False


def slide_kind(path: str | Path) -> str | None:
    """'tiff', 'openslide', 'dicom' or None, from the name (and, for files without a known
    extension and for folders, the DICOM magic); cheap, never raises."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        try:
            return "dicom" if _folder_has_dicom(p) else None
        except OSError:
            return None
    if name.endswith(SLIDE_SUFFIXES) or name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(OPENSLIDE_SUFFIXES):
        return "openslide"
    if name.endswith(DICOM_SUFFIXES) or is_dicom_file(p):
        return "dicom"
    return None


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    ``mpp`` overrides the file's pixel size (µm per level-0 pixel); a value no brightfield
    scan has (outside 0.05-20 µm/px, nan, inf) raises
    :class:`~napari_gpfm.slide.errors.ImplausibleMppError` before the file is opened. A
    special file (a FIFO, a device) is refused at once. Raises
    :class:`SlideOpenError` (one of its subclasses where it applies) naming the file and the
    problem when it cannot be read.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideOpenError(p, "no such file or folder")
    special = special_file_kind(p)
    if special is not None:  # opening a FIFO would block forever, a device read endlessly
        raise UnsupportedSlideError(
            p,
            f"not a regular file but {special}; napari-gpfm opens only regular files (or a "
            "folder of DICOM files). Copy the slide to a regular file first.",
        )
    if p.is_file() and os.path.getsize(p) == 0:
        raise EmptySlideError(p, "the file is empty (0 bytes)")
    kind = slide_kind(p)
    if kind is None:
        suffix = p.suffix or "extensionless"
        what = "a folder without DICOM files" if p.is_dir() else f"a {suffix} file"
        raise UnsupportedSlideError(
            p, f"not a whole-slide image format napari-gpfm reads ({what}). Supported: {SUPPORTED}."
        )
    if mpp is not None:  # a bad override is refused before the file is even opened
        mpp = validate_mpp(mpp, p, MPP_GIVEN)
    backend = _open_backend(p, kind)
    try:
        return Slide(backend, mpp=mpp, mpp_given=MPP_GIVEN)
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
        # Formats tiffslide does not parse (Philips TIFF, some BIF) may still be OpenSlide's;
        # when OpenSlide refuses them too, our message (what is true about the file) stands.
        from .backends.openslide import OpenSlideBackend, openslide_available

        final = ("truncated" in tiff_error.problem or "header is damaged" in tiff_error.problem)
        if not openslide_available() or final:
            raise
        try:
            return OpenSlideBackend(p)
        except SlideOpenError:
            raise tiff_error from None
