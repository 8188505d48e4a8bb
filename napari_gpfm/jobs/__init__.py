"""Long jobs as plain generators of :class:`Progress` records (no Qt, no napari).

Every dock, the CLI and the demo drive the same generators: iterate for progress, read the
return value for the result, close the generator to cancel.
"""

from .progress import Meter, Progress

__all__ = ["Meter", "Progress"]
