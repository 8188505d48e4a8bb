"""The one exception root of napari-gpfm, and how the command line shows an error.

Every error the package raises on bad input (a file that is missing, unreadable or of the wrong
kind; a model, recipe or setting that cannot work) derives from :class:`NapariGpfmError`, and its
message names the file and the problem. Each package keeps its own base (``SlideError``,
``EncoderError``, ``StoreError``, ...) under this root, with extra builtin bases
(``ValueError``, ``LookupError``, ``FileNotFoundError``, ``RuntimeError``) where callers catch
those.

The ``napari-gpfm`` command line turns a ``NapariGpfmError`` (or an ``OSError``) into one
``error: <message>`` line on stderr and exit code 2; any other exception is a bug and keeps its
traceback.

This module imports nothing from the package, nor numpy, torch, Qt or napari: the lowest layer
(``slide``) imports it.
"""

from __future__ import annotations

import errno as _errno
import os
from pathlib import Path

__all__ = [
    "InputFileError",
    "InputFileNotFoundError",
    "NapariGpfmError",
    "OutputWriteError",
    "UsageError",
    "error_line",
    "require_file",
]


class NapariGpfmError(Exception):
    """Every error the package raises on bad input derives from it; messages name the file and
    the problem."""


class InputFileError(NapariGpfmError, ValueError):
    """An input file (a table, a list of tiles...) is unreadable or lacks what the command
    needs; the file formats with their own error (slides, feature stores, classifiers,
    GeoJSON, configs) use that instead."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UsageError(NapariGpfmError, ValueError):
    """A command's options do not fit together (say which to give)."""


class InputFileNotFoundError(NapariGpfmError, FileNotFoundError):
    """An input file (or folder) that a command needs does not exist."""

    def __init__(self, path: str | os.PathLike, what: str = "input file") -> None:
        self.path = Path(path)
        self.what = what
        super().__init__(f"{self.path}: {what} not found")

    def __str__(self) -> str:  # FileNotFoundError would otherwise prefix an errno
        return self.args[0]


class OutputWriteError(NapariGpfmError, OSError):
    """An output file (feature store, table, GeoJSON, classifier...) could not be written: the
    disk is full (ENOSPC), an I/O error (EIO), no permission (EACCES, EROFS)...

    Outputs are written to a temporary file and renamed only when whole, so the previous file
    of that name (if any) is untouched. The message names the file, the errno's meaning and
    name, and what was kept. Also an ``OSError`` (``errno``, ``strerror`` and ``filename`` set),
    so code catching ``OSError`` still catches it.
    """

    def __init__(self, path: str | os.PathLike, err: int | None, kept: str = "",
                 detail: str = "") -> None:  # fmt: skip
        self.path = Path(path)
        self._init_args = (path, err, kept, detail)
        meaning = os.strerror(err) if err else (detail or "write failed")
        name = _errno.errorcode.get(err, "") if err else ""
        what = (f"{meaning[:1].lower()}{meaning[1:]}" if err else meaning) + (
            f" ({name})" if name else "")
        advice = {
            _errno.ENOSPC: "free some space or choose another output folder, then run again",
            _errno.EDQUOT: "free some space (disk quota) or choose another output folder",
            _errno.EACCES: "choose an output folder you may write to",
            _errno.EPERM: "choose an output folder you may write to",
            _errno.EROFS: "choose an output folder on a writable file system",
            _errno.EIO: "the disk or network file system reported an I/O error; check it, then "
                        "run again",
        }.get(err or -1, "run again once the problem is fixed")
        message = f"{self.path}: cannot write: {what}; {advice}"
        if kept:
            message += f"; {kept}"
        super().__init__(message)
        self.errno = err
        self.strerror = meaning
        self.filename = str(self.path)

    def __str__(self) -> str:  # OSError would otherwise format errno/strerror/filename
        return self.args[0]

    def __reduce__(self):  # picklable (job processes): rebuilt from the same arguments
        return (type(self), self._init_args)


def require_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """``path`` as a :class:`~pathlib.Path` when it exists (file or folder), else raise
    :class:`InputFileNotFoundError` naming it: a command checks its inputs before slow work."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputFileNotFoundError(p, what)
    return p


def error_line(exc: BaseException) -> str:
    """``error: <message>`` on one line (the command line's form of a bad-input error).

    An ``OSError`` that carries a file name reads ``<file>: <problem>``; a multi-line message is
    joined into one line.
    """
    if (isinstance(exc, OSError) and not isinstance(exc, NapariGpfmError)
            and exc.filename is not None and exc.strerror):
        names = [_name(exc.filename)]
        if exc.filename2 is not None:
            names.append(_name(exc.filename2))
        message = f"{' -> '.join(names)}: {exc.strerror}"
    else:
        message = str(exc) or type(exc).__name__
    return "error: " + " ".join(part.strip() for part in message.splitlines() if part.strip())


def _name(filename: object) -> str:
    if isinstance(filename, (str, bytes, os.PathLike)):
        return os.fsdecode(filename)
    return str(filename)
