"""Tile galleries, headless: which patches to show (similarity hits, cluster exemplars, a
selection) and their thumbnails, read from the slide at the store's recipe. No Qt here.

A thumbnail is the patch's level-0 square (top-left ``coords[i]``, side ``patch_size_level0``:
exactly what the encoder saw) read with :meth:`Slide.read_patches` and resized to ``size`` px,
so it equals ``open_slide(path).read_patch(x, y, patch_size_level0, size)``.

Reading runs wherever the caller likes: :func:`thumbnails` is plain numpy and slide I/O over
:class:`Tile` records and :class:`Source` snapshots (no layer, no session), so a Qt worker
thread can run it; gather the sources on the main thread with :func:`sources_for`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Source",
    "Tile",
    "cluster_exemplars",
    "exemplar_tiles",
    "hit_tiles",
    "selection_tiles",
    "sources_for",
    "thumbnails",
]

#: Thumbnail side in screen pixels (a 224 px patch at 0.5 µm/px shows at 0.43×).
DEFAULT_SIZE = 96


@dataclass(frozen=True)
class Tile:
    """One gallery tile: patch ``index`` of slide ``uid`` (layer ``slide`` at the time),
    with an optional ``score`` (cosine, distance...) and ``group`` (e.g. its cluster)."""

    uid: int
    index: int
    slide: str
    score: float | None = None
    score_name: str = ""
    group: int | None = None
    label: str = ""  # the caption's name line (default: the slide name)
    rank: int | None = None  # 1 = best (as numbered on the slide)

    @property
    def caption(self) -> str:
        """Rank and score (3 decimals) over the label or slide name."""
        name = self.label or self.slide
        first = " ".join(([f"#{self.rank}"] if self.rank is not None else [])
                         + ([f"{self.score:.3f}"] if self.score is not None else []))
        return f"{first}\n{name}" if first else name

    def tooltip(self, coord: Sequence[int] | None = None) -> str:
        lines = [f"slide: {self.slide}", f"patch: {self.index}"]
        if self.rank is not None:
            lines.insert(0, f"hit #{self.rank}")
        if coord is not None:
            lines.append(f"level-0 top-left: x={int(coord[0])}, y={int(coord[1])}")
        if self.group is not None:
            lines.append(f"cluster: {self.group}")
        if self.score is not None:
            lines.append(f"{self.score_name or 'score'}: {self.score:.4f}")
        lines.append("click: centre the viewer on this patch")
        return "\n".join(lines)


@dataclass(frozen=True)
class Source:
    """What reading a slide's thumbnails needs, copied from its session state (thread-safe:
    no layer, no session)."""

    slide: Any
    coords: np.ndarray
    patch_size_level0: int


def sources_for(session: Any, tiles: Iterable[Tile]) -> dict[int, Source]:
    """A :class:`Source` per slide of ``tiles`` still open in ``session`` (main thread)."""
    out: dict[int, Source] = {}
    for t in tiles:
        if t.uid in out:
            continue
        s = session.slides.get(t.uid)
        if s is None or not s.has_store:
            continue
        s.mpp  # noqa: B018 - follows Slide info's override (refreshes s.slide)
        out[t.uid] = Source(s.slide, s.coords, int(s.patch_size_level0))
    return out


def thumbnails(tiles: Sequence[Tile], sources: dict[int, Source], size: int = DEFAULT_SIZE,
               threads: int = 2) -> np.ndarray:  # fmt: skip
    """(N, size, size, 3) uint8 thumbnails of ``tiles`` in order (black where the slide is
    gone); patches of one slide are read together (shared native tiles decode once)."""
    out = np.zeros((len(tiles), size, size, 3), np.uint8)
    by_slide: dict[int, list[int]] = {}
    for i, t in enumerate(tiles):
        by_slide.setdefault(t.uid, []).append(i)
    for uid, rows in by_slide.items():
        src = sources.get(uid)
        if src is None:
            continue
        idx = np.array([tiles[r].index for r in rows], dtype=np.int64)
        coords = src.coords[idx]
        out[rows] = src.slide.read_patches(coords, src.patch_size_level0, size, threads=threads)
    return out


# ------------------------------------------------------------------------- what to show
def hit_tiles(result: Any, limit: int | None = None) -> list[Tile]:
    """Similarity hits (a session ``SimilarityResult``), best first."""
    hits = result.hits if limit is None else result.hits[:limit]
    return [Tile(int(uid), int(i), result.names.get(uid, "?"), float(sc), "cosine", rank=r)
            for r, (uid, i, sc) in enumerate(hits, 1)]  # fmt: skip


def cluster_exemplars(clusters: Any, per_cluster: int = 4) -> dict[int, np.ndarray]:
    """The ``per_cluster`` patches nearest each cluster's centre (smallest
    ``ClusterResult.distances`` among its members), nearest first, per cluster id."""
    labels = np.asarray(clusters.labels)
    dist = np.asarray(clusters.distances, dtype=np.float64)
    out: dict[int, np.ndarray] = {}
    for c in np.unique(labels[labels >= 0]).tolist():
        members = np.flatnonzero(labels == c)
        order = np.lexsort((members, dist[members]))  # by distance, ties by index
        out[int(c)] = members[order[:per_cluster]].astype(np.int64)
    return out


def exemplar_tiles(state: Any, per_cluster: int = 4) -> list[Tile]:
    """Cluster exemplars of a slide state as tiles, cluster by cluster."""
    if state.clusters is None:
        return []
    dist = state.clusters.distances
    return [Tile(state.uid, int(i), state.name, float(dist[i]), "distance to centre", c,
                 f"Cluster {c}")
            for c, idx in cluster_exemplars(state.clusters, per_cluster).items()
            for i in idx]  # fmt: skip


def selection_tiles(state: Any, indices: Sequence[int] | np.ndarray, limit: int = 50,
                    seed: int = 0) -> list[Tile]:  # fmt: skip
    """Up to ``limit`` selected patches (a seeded sample when more are selected, in index
    order), coloured by cluster when the slide is clustered."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
    labels = None if state.clusters is None else state.clusters.labels
    return [Tile(state.uid, int(i), state.name, group=None if labels is None else int(labels[i]),
                 label=f"patch {int(i)}") for i in idx]  # fmt: skip
