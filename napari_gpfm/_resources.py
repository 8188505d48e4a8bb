"""Where the data that ships with the package lives.

In an installed wheel, ``models/`` and ``sample_data/`` are inside the package (the wheel build
copies them there); in a source checkout they are the repository-root folders beside it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_SLIDE = "CMU-1-Small-Region.svs"


def resource_dir(name: str) -> Path:
    """The shipped folder ``name`` ('models' or 'sample_data')."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"napari-gpfm's {name}/ folder is missing from {PACKAGE_DIR} and {PACKAGE_DIR.parent}: "
        "the installation is incomplete; reinstall napari-gpfm."
    )


def sample_slide_path() -> Path:
    """The bundled CC0 sample slide (OpenSlide test data CMU-1-Small-Region.svs)."""
    path = resource_dir("sample_data") / SAMPLE_SLIDE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundled sample slide is missing; reinstall napari-gpfm.")
    return path
