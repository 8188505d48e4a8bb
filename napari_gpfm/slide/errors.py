"""Errors and warnings of the slide layer. Every message names the file and the problem."""

from __future__ import annotations

from pathlib import Path

from napari_gpfm.errors import NapariGpfmError


class SlideError(NapariGpfmError):
    """Base class: something is wrong with a slide file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class SlideOpenError(SlideError):
    """The file cannot be opened as a whole-slide image. The subclasses say which of the three
    cases it is: :class:`UnsupportedSlideError`, :class:`DamagedSlideError`,
    :class:`EmptySlideError`; the base class itself is raised for the rest (no such file, a
    folder holding several slides)."""


class UnsupportedSlideError(SlideOpenError):
    """The file is intact but of a kind napari-gpfm does not read (another format, a
    compression no installed decoder handles, a fluorescence or z-stack image): the message
    says what it is and what is supported."""


class DamagedSlideError(SlideOpenError):
    """The file claims a slide format but its structure is broken (truncated, not a TIFF
    although named ``.svs``, unreadable DICOM header): copy or download it again."""


class EmptySlideError(SlideOpenError):
    """The file has no bytes, or the folder no image instances."""


class MissingMppError(SlideError):
    """An operation needs the physical pixel size (µm/px) and the slide does not record it.

    ``detail`` says why, when the file records a value that was refused (see
    :func:`napari_gpfm.slide.mpp.check_file_mpp`)."""

    def __init__(self, path: str | Path, action: str = "this operation", detail: str | None = None):
        why = (
            f"the slide records no usable pixel size (microns per pixel), which {action} "
            f"needs: {detail}."
            if detail
            else "the slide does not record its pixel size (microns per pixel), which "
            f"{action} needs."
        )
        super().__init__(
            path,
            f"{why} "
            "Set it with --mpp X on the command line, or in the 'Slide info' panel in napari "
            "(e.g. 0.25 for a 40x scan, 0.5 for 20x).",
        )


class ImplausibleMppError(SlideError, ValueError):
    """A pixel size given by the user (``--mpp``, ``open_slide(mpp=)``, ``Slide.with_mpp``, the
    'Slide info' panel) is not a plausible level-0 pixel size of a brightfield scan."""


class TileReadError(SlideError):
    """A native tile could not be read or decoded."""

    def __init__(self, path: str | Path, level: int, tx: int, ty: int, reason: str):
        self.level, self.tx, self.ty = level, tx, ty
        super().__init__(path, f"tile (column {tx}, row {ty}) of level {level} is unreadable: {reason}")


class MissingMppWarning(UserWarning):
    """The slide opened in pixel units because it records no pixel size."""


class SlideReadWarning(UserWarning):
    """A tile failed while viewing; it is shown blank and the viewer keeps running."""


class SlideMetadataWarning(UserWarning):
    """Optional metadata of a slide could not be read; the pixels are read all the same."""


class ImplausibleMppWarning(SlideMetadataWarning):
    """The file records a pixel size outside the plausible range; it is treated as not
    recorded (the message says what was read, from where, and how to set the right one)."""


class TruncatedSlideWarning(SlideMetadataWarning):
    """The file is cut short after the pixels of its first level(s): pages listed after them
    (associated images such as the label and macro, or further levels) are missing."""
