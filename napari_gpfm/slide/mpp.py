"""The one pixel-size validator: the file's value, ``--mpp`` / ``open_slide(mpp=)``,
``Slide.with_mpp`` and the 'Slide info' panel's override all go through it.

A level-0 pixel size of a brightfield scan lies between :data:`MPP_RANGE` µm/px (0.05 for the
finest 80-100x scanners' pixels, 20 for a 0.5x overview). A value outside it, zero, negative,
``nan`` or ``inf`` cannot be right: a user-given one is refused (:class:`ImplausibleMppError`,
saying what was given and how to give the right one); a file's one is treated as not recorded
and the slide says so (:class:`ImplausibleMppWarning` when it opens, the reason repeated by
:class:`MissingMppError` when an operation needs the pixel size). Never used silently.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import ImplausibleMppError

#: Plausible level-0 pixel sizes of brightfield whole-slide scans, µm/px (inclusive).
MPP_RANGE = (0.05, 20.0)

HOW_TO_SET = (
    "Give the slide's real pixel size with --mpp X on the command line, mpp=X in Python "
    "(open_slide, Slide.with_mpp), or in the 'Slide info' panel in napari (e.g. 0.25 for a 40x "
    "scan, 0.5 for 20x)."
)


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def mpp_problem(value: object) -> str | None:
    """``None`` when ``value`` is a plausible level-0 pixel size (µm/px), else why not."""
    v = _as_float(value)
    lo, hi = MPP_RANGE
    if v is None:
        return "not a number"
    if math.isnan(v):
        return "not a number (nan)"
    if math.isinf(v):
        return "infinite"
    if v <= 0:
        return "zero or negative"
    if v < lo:
        return f"below {lo:g} µm/px"
    if v > hi:
        return f"above {hi:g} µm/px"
    return None


def _shown(value: object) -> str:
    v = _as_float(value)
    return f"{v:g}" if v is not None else repr(value)


def validate_mpp(value: object, path: str | Path, source: str = "given") -> float:
    """``value`` as float when it is a plausible pixel size, else :class:`ImplausibleMppError`
    naming the slide, the value, where it came from (``source``, e.g. "given with --mpp") and
    how to give the right one."""
    problem = mpp_problem(value)
    if problem is None:
        return float(value)  # type: ignore[arg-type]
    lo, hi = MPP_RANGE
    raise ImplausibleMppError(
        path,
        f"the pixel size {_shown(value)} µm/px {source} is not plausible for a brightfield "
        f"scan ({problem}): level-0 pixel sizes lie between {lo:g} and {hi:g} µm/px. "
        f"{HOW_TO_SET}",
    )


def check_file_mpp(
    candidates: list[tuple[object, str]], path: str | Path
) -> tuple[float | None, str | None]:
    """The file's pixel size from ``candidates`` (``(value, where it was read)``, first present
    one wins: e.g. mpp-x, then mpp-y): ``(mpp, None)``, ``(None, None)`` when the file records
    none, or ``(None, note)`` when it records an implausible one; ``note`` says what was read,
    from where, and that it is treated as not recorded."""
    for value, where in candidates:
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        problem = mpp_problem(value)
        if problem is None:
            return float(value), None  # type: ignore[arg-type]
        lo, hi = MPP_RANGE
        return None, (
            f"the file records a pixel size of {_shown(value)} µm/px [{where}], {problem}: "
            f"not plausible for a brightfield scan (level-0 pixel sizes lie between {lo:g} and "
            f"{hi:g} µm/px), so it is treated as not recorded"
        )
    return None, None


def implausible_file_mpp_message(path: str | Path, note: str) -> str:
    """The warning shown when a slide opens with an implausible recorded pixel size."""
    return f"{Path(path)}: {note}. {HOW_TO_SET}"
