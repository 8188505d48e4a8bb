"""Image sources for distillation: folders of tiles and patches sampled from local slides.

A source is indexable: ``len(source)``, ``source.read(i) -> uint8 (H, W, 3)`` and
``source.label(i) -> int`` (class index from the tile's sub-folder, ``-1`` when unlabelled).
Sources hold only paths and coordinates, so they pickle cheaply into DataLoader workers; slides
are opened lazily in each process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..slide.open import READER_SUFFIXES as SLIDE_SUFFIXES
from .config import Config

TILE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
UNLABELLED = -1


class ImageSource(Protocol):
    classes: list[str]

    def __len__(self) -> int: ...
    def read(self, index: int) -> np.ndarray: ...
    def label(self, index: int) -> int: ...
    def describe(self) -> dict[str, Any]: ...


def _as_rgb(array: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D image array -> uint8 (H, W, 3)."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def read_tile(path: Path) -> np.ndarray:
    """Decode one tile file to uint8 (H, W, 3)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        return _as_rgb(tifffile.imread(path))
    with Image.open(path) as image:
        return _as_rgb(np.asarray(image.convert("RGB")))


class TileFolderSource:
    """All tile images under one or more folders (recursive, sorted).

    A tile directly inside ``root/<class>/...`` is labelled with ``<class>``; classes are the
    sorted union over roots.
    """

    def __init__(self, roots: Sequence[str | Path]) -> None:
        self.roots = [Path(r).expanduser() for r in roots]
        self.paths: list[Path] = []
        names: list[str] = []
        for root in self.roots:
            if not root.is_dir():
                raise FileNotFoundError(f"tile folder {root} does not exist")
            found = sorted(p for p in root.rglob("*") if p.suffix.lower() in TILE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no tiles ({', '.join(sorted(TILE_SUFFIXES))}) in {root}")
            self.paths += found
            names += [p.relative_to(root).parts[0] if p.parent != root else "" for p in found]
        self.classes = sorted({n for n in names if n})
        lookup = {name: i for i, name in enumerate(self.classes)}
        self._labels = [lookup.get(n, UNLABELLED) for n in names]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        return read_tile(self.paths[index])

    def label(self, index: int) -> int:
        return self._labels[index]

    def describe(self) -> dict[str, Any]:
        roots = [str(r) for r in self.roots]
        return {"tiles": roots, "n_tiles": len(self), "classes": self.classes}


def expand_slide_paths(items: Sequence[str | Path]) -> list[Path]:
    """Slide files, with folders replaced by the slide files directly inside them."""
    paths: list[Path] = []
    for item in (Path(p).expanduser() for p in items):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"slide {item} does not exist")
    return paths


def annotation_file(slide: Path) -> Path | None:
    """``<slide name>.geojson`` beside the slide (QuPath's export, or the Annotate dock's
    save), if there is one."""
    for candidate in (slide.with_suffix(".geojson"), slide.parent / f"{slide.name}.geojson"):
        if candidate.is_file():
            return candidate
    return None


class SlidePatchSource:
    """Tissue patches of local slides on an exact-mpp grid (napari_gpfm.slide / .tiles).

    The grid of every slide is computed once at construction; patches are read on demand at
    ``data.patch_size`` pixels. With ``data.annotations: true`` a slide whose annotations sit
    beside it (:func:`annotation_file`) labels its patches by class (half a patch inside a
    class's shapes, :func:`napari_gpfm.annotations.labels_from_annotations`); the supervised
    term then uses them. Other patches are unlabelled.
    """

    def __init__(self, slides: Sequence[str | Path], cfg: Config) -> None:
        from napari_gpfm.slide import open_slide
        from napari_gpfm.tiles import GridSpec, TissueParams, detect_tissue, make_grid

        data = cfg["data"]
        self.paths = expand_slide_paths(slides)
        if not self.paths:
            raise FileNotFoundError(f"no slides found in {list(slides)}")
        self.mpp = data["slide_mpp"]
        self.out_size = int(data["patch_size"])
        spec = GridSpec(
            target_mpp=data["target_mpp"], patch_size=self.out_size, overlap=0,
            min_tissue=data["min_tissue"],
        )
        self.size0: list[int] = []
        coords: list[np.ndarray] = []
        named: list[tuple[np.ndarray, list[str]]] = []
        self.annotation_files: list[str] = []
        for path in self.paths:
            slide = open_slide(path, mpp=self.mpp)
            grid = make_grid(slide, spec, detect_tissue(slide, TissueParams()))
            self.size0.append(int(grid.patch_size_level0))
            coords.append(np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2))
            named.append(self._annotation_labels(path, coords[-1], self.size0[-1], data))
        self.index = np.concatenate(
            [np.column_stack([np.full(len(c), i), c]) for i, c in enumerate(coords)]
        )
        if not len(self.index):
            raise ValueError(f"no tissue patches found in {len(self.paths)} slide(s)")
        self.classes = sorted({c for _, names in named for c in names})
        lookup = {c: i for i, c in enumerate(self.classes)}
        self._labels = np.concatenate([
            np.array([lookup[names[i]] if i >= 0 else UNLABELLED for i in labels], dtype=np.int64)
            for labels, names in named]) if named else np.zeros(0, dtype=np.int64)
        self._open: dict[int, Any] = {}

    def _annotation_labels(self, path: Path, coords: np.ndarray, size0: int, data: Config
                           ) -> tuple[np.ndarray, list[str]]:
        """(per-patch class index into the names, -1 unlabelled; class names) of one slide."""
        unlabelled = (np.full(len(coords), UNLABELLED, dtype=np.int64), [])
        found = annotation_file(path) if data.get("annotations", False) else None
        if found is None or not len(coords):
            return unlabelled
        from napari_gpfm.annotations import labels_from_annotations, read_geojson

        labels = labels_from_annotations(read_geojson(found), coords, size0)
        self.annotation_files.append(str(found))
        return np.asarray(labels.labels, dtype=np.int64), list(labels.class_names)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # slide handles stay in their process

    def read(self, index: int) -> np.ndarray:
        slide_id, x, y = (int(v) for v in self.index[index])
        if slide_id not in self._open:
            from napari_gpfm.slide import open_slide

            self._open[slide_id] = open_slide(self.paths[slide_id], mpp=self.mpp)
        patch = self._open[slide_id].read_patch(x, y, self.size0[slide_id], self.out_size)
        return _as_rgb(np.asarray(patch))

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slides": [str(p) for p in self.paths], "n_patches": len(self)}
        if self.annotation_files:
            out.update(annotations=self.annotation_files, classes=self.classes,
                       n_labelled=int((self._labels != UNLABELLED).sum()))
        return out


class ConcatSource:
    """Several sources read as one; class names are merged, indices remapped."""

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.classes = sorted({c for s in self.sources for c in s.classes})

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[ImageSource, int]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[k], index - int(self.offsets[k])

    def read(self, index: int) -> np.ndarray:
        source, local = self._locate(index)
        return source.read(local)

    def label(self, index: int) -> int:
        source, local = self._locate(index)
        label = source.label(local)
        return UNLABELLED if label == UNLABELLED else self.classes.index(source.classes[label])

    def describe(self) -> dict[str, Any]:
        return {"sources": [s.describe() for s in self.sources], "n_images": len(self)}


def build_source(cfg: Config) -> ImageSource:
    """The configured tile folders and slides as one source."""
    data = cfg["data"]
    sources: list[ImageSource] = []
    if data["tiles"]:
        sources.append(TileFolderSource(data["tiles"]))
    if data["slides"]:
        sources.append(SlidePatchSource(data["slides"], cfg))
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
