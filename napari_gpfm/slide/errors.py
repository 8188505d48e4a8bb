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
    """The file cannot be opened as a whole-slide image (empty, truncated, not a slide...)."""


class MissingMppError(SlideError):
    """An operation needs the physical pixel size (µm/px) and the slide does not record it."""

    def __init__(self, path: str | Path, action: str = "this operation"):
        super().__init__(
            path,
            f"the slide does not record its pixel size (microns per pixel), which {action} needs. "
            "Set it with --mpp X on the command line, or in the 'Slide info' panel in napari "
            "(e.g. 0.25 for a 40x scan, 0.5 for 20x).",
        )


class TileReadError(SlideError):
    """A native tile could not be read or decoded."""

    def __init__(self, path: str | Path, level: int, tx: int, ty: int, reason: str):
        self.level, self.tx, self.ty = level, tx, ty
        super().__init__(path, f"tile (column {tx}, row {ty}) of level {level} is unreadable: {reason}")


class MissingMppWarning(UserWarning):
    """The slide opened in pixel units because it records no pixel size."""


class SlideReadWarning(UserWarning):
    """A tile failed while viewing; it is shown blank and the viewer keeps running."""
