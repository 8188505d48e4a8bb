"""Class palette: the annotation classes, their colours and the active class.

A :class:`ClassPalette` is an ordered list of :class:`ClassSpec` (name + RGB 0-255), with one
*active* class (the class new shapes get). The order fixes class indices everywhere: a class map
paints class ``i`` as label ``i + 1``, a painted Labels layer uses ``i + 1`` for class ``i``, and
a classifier's probability columns follow it.

Colours are QuPath-compatible: 8-bit RGB, written into GeoJSON ``classification.color``;
:meth:`ClassPalette.to_qupath` / :func:`packed_rgb` give QuPath's packed ``colorRGB`` ints (the
format of a QuPath project's ``classifiers/classes/classes.json``), and :meth:`ClassPalette.load`
reads both our JSON and QuPath's. Default colours for QuPath's built-in class names (Tumor,
Stroma, Immune cells, Necrosis, Other, Region*, Ignore*, Positive, Negative) are QuPath's own.

Persistence: :meth:`ClassPalette.save` writes ``classes.json`` (see :func:`palette_path`) next to
the project folder or feature store. Observers registered with :meth:`ClassPalette.connect` are
called after every change (no napari or Qt here).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ClassSpec",
    "ClassPalette",
    "QUPATH_DEFAULT_COLOURS",
    "PALETTE_FILENAME",
    "palette_path",
    "packed_rgb",
    "unpack_rgb",
    "parse_colour",
]

PALETTE_FILENAME = "classes.json"
_FORMAT = "napari-gpfm-classes/1"

#: QuPath's default colours for its built-in classes (``PathClassFactory.StandardPathClasses``).
QUPATH_DEFAULT_COLOURS: dict[str, tuple[int, int, int]] = {
    "Tumor": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (200, 50, 50),
    "Negative": (112, 112, 225),
}

# Distinct colours for other classes, in order of creation (Okabe-Ito, then Tableau-like).
_CYCLE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (31, 119, 180), (255, 127, 14), (44, 160, 44),
    (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
    (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def packed_rgb(rgb: Sequence[int]) -> int:
    """QuPath's packed ``colorRGB``: a signed 32-bit ARGB int with alpha 255."""
    r, g, b = (int(v) & 255 for v in rgb[:3])
    v = (255 << 24) | (r << 16) | (g << 8) | b
    return v - (1 << 32) if v >= (1 << 31) else v


def unpack_rgb(value: int) -> tuple[int, int, int]:
    """Inverse of :func:`packed_rgb` (alpha ignored)."""
    v = int(value) & 0xFFFFFFFF
    return ((v >> 16) & 255, (v >> 8) & 255, v & 255)


def parse_colour(colour: Any) -> tuple[int, int, int]:
    """RGB 0-255 from ``[r, g, b]`` (0-255 ints, or 0-1 floats), ``"#rrggbb"`` or a packed int."""
    if isinstance(colour, (int, np.integer)) and not isinstance(colour, bool):
        return unpack_rgb(int(colour))
    if isinstance(colour, str):
        s = colour.lstrip("#")
        if len(s) not in (6, 8) or any(c not in "0123456789abcdefABCDEF" for c in s):
            raise ValueError(f"colour {colour!r} is not '#rrggbb'")
        return (int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16))
    arr = np.asarray(colour, dtype=np.float64).reshape(-1)
    if arr.size < 3:
        raise ValueError(f"colour {colour!r} needs three components")
    arr = arr[:3]
    is_float = any(isinstance(v, (float, np.floating)) for v in np.asarray(colour).reshape(-1)[:3])
    if is_float and arr.max() <= 1.0:
        arr = arr * 255
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"colour {colour!r} is outside 0-255")
    return tuple(int(round(v)) for v in arr)  # type: ignore[return-value]


def default_colour(name: str, taken: Iterable[tuple[int, int, int]] = ()) -> tuple[int, int, int]:
    """QuPath's colour for its built-in names (``Ignore*``-style prefixes too), else the first
    colour of the cycle not yet ``taken``."""
    if name in QUPATH_DEFAULT_COLOURS:
        return QUPATH_DEFAULT_COLOURS[name]
    for key, rgb in QUPATH_DEFAULT_COLOURS.items():
        if key.endswith("*") and name.startswith(key[:-1]):
            return rgb
    used = set(taken)
    for rgb in _CYCLE:
        if rgb not in used:
            return rgb
    # all taken: a deterministic colour from the name
    digest = hashlib.sha256(name.encode()).digest()
    return (digest[0], digest[1], digest[2])


def palette_path(anchor: str | os.PathLike) -> Path:
    """Where the palette of a project lives: ``<folder>/classes.json`` for a folder, or
    ``<file stem>.classes.json`` beside a file (a feature store, a GeoJSON)."""
    p = Path(anchor)
    if p.is_dir() or not p.suffix:
        return p / PALETTE_FILENAME
    return p.with_name(p.name.split(".")[0] + "." + PALETTE_FILENAME)


@dataclass(frozen=True)
class ClassSpec:
    """One class: its name and RGB colour (0-255)."""

    name: str
    colour: tuple[int, int, int]

    @property
    def excluded(self) -> bool:
        """QuPath ``Ignore*`` classes mark regions left out of training."""
        return self.name.startswith("Ignore")

    @property
    def rgba(self) -> np.ndarray:
        """(4,) float RGBA 0-1, for napari colours."""
        return np.array([*(c / 255.0 for c in self.colour), 1.0])


class ClassPalette:
    """Ordered classes with colours, and the active class (see module docstring)."""

    def __init__(self, classes: Iterable[ClassSpec | tuple[str, Any]] = (), active: str | None = None):
        self._classes: list[ClassSpec] = []
        self._active: str | None = None
        self._observers: list[Callable[[ClassPalette], None]] = []
        for c in classes:
            if isinstance(c, ClassSpec):
                self.add(c.name, c.colour)
            else:
                self.add(c[0], c[1])
        if active is not None:
            self.set_active(active)

    # --- queries ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._classes)

    def __iter__(self):
        return iter(self._classes)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self._classes)

    def __repr__(self) -> str:
        return f"ClassPalette({[(c.name, c.colour) for c in self._classes]}, active={self._active!r})"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self._classes]

    @property
    def training_names(self) -> list[str]:
        """Classes a classifier learns (``Ignore*`` left out), in palette order."""
        return [c.name for c in self._classes if not c.excluded]

    @property
    def active(self) -> str | None:
        return self._active

    def index(self, name: str) -> int:
        for i, c in enumerate(self._classes):
            if c.name == name:
                return i
        raise KeyError(f"no class {name!r} (classes: {self.names})")

    def colour(self, name: str) -> tuple[int, int, int]:
        return self._classes[self.index(name)].colour

    def colours(self, names: Sequence[str] | None = None) -> np.ndarray:
        """(C, 3) int RGB 0-255 of ``names`` (default: all classes)."""
        names = self.names if names is None else names
        return np.array([self.colour(n) for n in names], dtype=np.int64).reshape(-1, 3)

    # --- edits --------------------------------------------------------------------------------
    def connect(self, callback: Callable[[ClassPalette], None]) -> None:
        """Call ``callback(palette)`` after every change."""
        self._observers.append(callback)

    def disconnect(self, callback: Callable[[ClassPalette], None]) -> None:
        self._observers = [c for c in self._observers if c is not callback]

    def _changed(self) -> None:
        for cb in list(self._observers):
            cb(self)

    def add(self, name: str, colour: Any = None) -> ClassSpec:
        """Add a class (colour: QuPath default for its name, else the next free one)."""
        name = str(name).strip()
        if not name:
            raise ValueError("a class needs a non-empty name")
        if name in self:
            raise ValueError(f"class {name!r} already exists")
        rgb = (
            default_colour(name, (c.colour for c in self._classes))
            if colour is None
            else parse_colour(colour)
        )
        spec = ClassSpec(name, rgb)
        self._classes.append(spec)
        if self._active is None and not spec.excluded:
            self._active = name
        self._changed()
        return spec

    def ensure(self, name: str, colour: Any = None, overwrite_colour: bool = False) -> ClassSpec:
        """The class ``name``, added if missing; ``overwrite_colour`` adopts ``colour`` for an
        existing class (used when importing a QuPath file, whose colours win)."""
        if name in self:
            if overwrite_colour and colour is not None:
                rgb = parse_colour(colour)
                if rgb != self.colour(name):
                    self.recolour(name, rgb)
            return self._classes[self.index(name)]
        return self.add(name, colour)

    def rename(self, old: str, new: str) -> None:
        new = str(new).strip()
        i = self.index(old)
        if not new:
            raise ValueError("a class needs a non-empty name")
        if new != old and new in self:
            raise ValueError(f"class {new!r} already exists")
        self._classes[i] = ClassSpec(new, self._classes[i].colour)
        if self._active == old:
            self._active = new
        self._changed()

    def recolour(self, name: str, colour: Any) -> None:
        i = self.index(name)
        self._classes[i] = ClassSpec(name, parse_colour(colour))
        self._changed()

    def remove(self, name: str) -> None:
        i = self.index(name)
        del self._classes[i]
        if self._active == name:
            rest = [c.name for c in self._classes if not c.excluded] or self.names
            self._active = rest[0] if rest else None
        self._changed()

    def set_active(self, name: str | None) -> None:
        if name is not None:
            self.index(name)  # raises for unknown names
        if name != self._active:
            self._active = name
            self._changed()

    def update_from(self, other: ClassPalette) -> None:
        """Take ``other``'s classes and active class (one change notification)."""
        self._classes = list(other._classes)
        self._active = other._active
        self._changed()

    # --- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "classes": [
                {"name": c.name, "color": list(c.colour), "colorRGB": packed_rgb(c.colour)}
                for c in self._classes
            ],
            "active": self._active,
        }

    def to_qupath(self) -> dict:
        """QuPath's project class list (``classifiers/classes/classes.json``)."""
        return {"pathClasses": [{"name": c.name, "color": packed_rgb(c.colour)} for c in self]}

    @classmethod
    def from_dict(cls, data: dict, source: str = "<palette>") -> ClassPalette:
        """From :meth:`to_dict` output or a QuPath ``classes.json`` (``pathClasses``)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object with a class list")
        items = data.get("classes", data.get("pathClasses"))
        if not isinstance(items, list):
            raise ValueError(f"{source}: no 'classes' (or QuPath 'pathClasses') list")
        pal = cls()
        for i, item in enumerate(items):
            try:
                name = item["name"]
                colour = item.get("color", item.get("colorRGB"))
                pal.add(name, colour)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{source}: class entry {i} is invalid ({exc})") from exc
        active = data.get("active")
        if active in pal:
            pal._active = active
        return pal

    def save(self, path: str | os.PathLike, qupath: bool = False) -> Path:
        """Write the palette as JSON (``qupath=True``: QuPath's ``pathClasses`` format)."""
        path = Path(path)
        if path.is_dir():
            path = path / PALETTE_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(self.to_qupath() if qupath else self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassPalette:
        """Read a palette file (ours or QuPath's); a folder means its ``classes.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / PALETTE_FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: class palette file not found") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        return cls.from_dict(data, str(path))

    @classmethod
    def from_annotations(cls, annotations: Iterable[Any], base: ClassPalette | None = None):
        """A palette with every class met in ``annotations`` (objects with ``class_name`` and
        ``color``); the annotations' colours win over ``base``'s."""
        pal = cls() if base is None else cls(list(base), base.active)
        for a in annotations:
            if getattr(a, "class_name", None):
                pal.ensure(a.class_name, getattr(a, "color", None), overwrite_colour=True)
        return pal
