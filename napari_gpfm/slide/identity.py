"""Slide identity: a cheap fingerprint telling two files with the same name apart.

A slide's *name* (:attr:`Slide.name`, TRIDENT's rule: the file name without its last extension)
names its feature files, so two different files can share it (``X.svs`` in two folders, a file
replaced by another one). The fingerprint is what a feature file records to know which file it
was computed from:

- ``size``: bytes of the file (for a DICOM slide: the sum over its instances, the files of its
  series);
- ``width``, ``height``: level-0 pixels;
- ``digest``: SHA-256 of cheap bytes: the first 1 MiB and the last 64 KiB of the file (for a
  DICOM slide: the sorted file names and sizes, and the first 64 KiB of at most 8 instances).

Computing it reads about 1 MiB and never decodes a tile (milliseconds); it is cached on the
:class:`~napari_gpfm.slide.Slide`.

The fingerprint identifies the *file*. ``path`` and ``mpp`` are kept only for messages
(:meth:`SlideFingerprint.describe`) and are not compared: the same file opened from another
folder (a copy, a symlink, a moved project) is the same slide, and a user mpp override
(:meth:`Slide.with_mpp`) is part of the embedding recipe already, so the fingerprint's ``mpp`` is
the one recorded in the file (``None`` when it records none) whatever the override.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FINGERPRINT_SCHEME", "SlideFingerprint", "slide_fingerprint"]

#: Version of the digest recipe; fingerprints of different schemes compare size and dimensions only.
FINGERPRINT_SCHEME = "v1"
HEAD_BYTES = 1 << 20  # first 1 MiB of a file
TAIL_BYTES = 64 << 10  # last 64 KiB of a file
DICOM_HEAD_BYTES = 64 << 10  # first 64 KiB of each DICOM instance...
DICOM_MAX_FILES = 8  # ...of at most this many instances


@dataclass(frozen=True)
class SlideFingerprint:
    """What identifies a slide file, cheaply (see the module doc).

    Equality (``==``, :meth:`matches`) compares ``size``, ``width``, ``height``, ``digest`` (and
    ``n_files``); ``path`` and ``mpp`` are descriptive only.
    """

    size: int
    width: int
    height: int
    digest: str
    mpp: float | None = field(default=None, compare=False)
    path: str = field(default="", compare=False)
    n_files: int = 1
    scheme: str = FINGERPRINT_SCHEME

    def matches(self, other: SlideFingerprint) -> bool:
        """True when both describe the same file (digests compared only under one scheme)."""
        same_geometry = (self.size, self.width, self.height, self.n_files) == (
            other.size, other.width, other.height, other.n_files)  # fmt: skip
        if self.scheme != other.scheme:
            return same_geometry
        return same_geometry and self.digest == other.digest

    def describe(self) -> str:
        """``/path/a.svs (12,345,678 bytes, 2220×2967 px, 0.499 µm/px)``."""
        parts = [f"{self.size:,} bytes" + (f" in {self.n_files} files" if self.n_files > 1 else "")]
        parts.append(f"{self.width}×{self.height} px")
        parts.append(f"{self.mpp:g} µm/px" if self.mpp else "no mpp recorded")
        return f"{self.path or '<unknown path>'} ({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), as stored in feature files."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlideFingerprint:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["size"], kw["width"], kw["height"] = int(kw["size"]), int(kw["width"]), int(kw["height"])
        kw["mpp"] = None if kw.get("mpp") in (None, "") else float(kw["mpp"])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str | bytes) -> SlideFingerprint:
        """Inverse of :meth:`to_json`; raises ``ValueError`` for anything unreadable."""
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        try:
            return cls.from_dict(json.loads(text))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a slide fingerprint ({e})") from e


def _file_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(HEAD_BYTES))
        if size > HEAD_BYTES:
            f.seek(max(HEAD_BYTES, size - TAIL_BYTES))
            h.update(f.read(TAIL_BYTES))
    return h.hexdigest()


def _dicom_digest(files: list[Path]) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    sizes = []
    for p in files:
        s = p.stat().st_size
        sizes.append(s)
        total += s
        h.update(f"{p.name}\0{s}\n".encode())
    for p in files[:DICOM_MAX_FILES]:
        with open(p, "rb") as f:
            h.update(f.read(DICOM_HEAD_BYTES))
    return h.hexdigest(), total


def _is_dicom(slide: Any) -> bool:
    backend = getattr(slide, "backend", None)
    return getattr(backend, "name", None) == "wsidicom" or Path(slide.path).is_dir()


def _file_mpp(slide: Any) -> float | None:
    backend = getattr(slide, "backend", None)
    if backend is not None and hasattr(backend, "mpp"):
        return backend.mpp
    return None if getattr(slide, "mpp_source", None) == "user" else getattr(slide, "mpp", None)


def compute_fingerprint(slide: Any) -> SlideFingerprint:
    """The fingerprint of ``slide`` (uncached; use :func:`slide_fingerprint`)."""
    path = Path(slide.path)
    dims = getattr(slide, "dimensions", None) or slide.level_dimensions[0]
    width, height = int(dims[0]), int(dims[1])
    mpp = _file_mpp(slide)
    if _is_dicom(slide):
        from .backends.dicom import dicom_files

        folder = path if path.is_dir() else path.parent
        files = list(getattr(getattr(slide, "backend", None), "files", None) or dicom_files(folder))
        digest, size = _dicom_digest(files)
        return SlideFingerprint(size, width, height, digest, mpp, os.path.abspath(folder),
                                n_files=len(files))  # fmt: skip
    size = path.stat().st_size
    return SlideFingerprint(size, width, height, _file_digest(path, size), mpp,
                            os.path.abspath(path))  # fmt: skip


def slide_fingerprint(slide: Any) -> SlideFingerprint:
    """The fingerprint of ``slide``'s file (DICOM: folder), computed once per Slide object."""
    cached = getattr(slide, "_fingerprint", None)
    if isinstance(cached, SlideFingerprint):
        return cached
    fp = compute_fingerprint(slide)
    try:
        slide._fingerprint = fp
    except AttributeError:  # slots / frozen stand-ins: not cached
        pass
    return fp
