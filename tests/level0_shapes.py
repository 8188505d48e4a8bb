"""Rectangles as closed polygon rings in level-0 pixels, shared by annotation, classifier and
job tests."""

from __future__ import annotations

import numpy as np


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """The closed ring (x, y) of the rectangle [x0, x1] × [y0, y1], first vertex repeated."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
