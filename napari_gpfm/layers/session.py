"""Headless explorer state behind the GPFM docks: slide layer ↔ feature store ↔ patch grid ↔
similarity index, plus the analyses run on them. No Qt here.

One :class:`Explorer` per viewer (:func:`explorer_for`) holds a :class:`SlideSession` per slide
layer with a loaded store. The "GPFM" dock and the embedding-plot dock share it and talk through
its events (napari's pure-Python ``EmitterGroup``):

- ``sessions``: a store was loaded or removed (``event.value`` = slide layer name);
- ``clusters``: k-means ran on a slide (``event.value`` = name);
- ``similarity``: a query finished (``event.value`` = :class:`SimilarityResult`);
- ``selection``: patches were selected (``event.value`` = (name, indices));
- ``hover``: the patch under the mouse changed (``event.value`` = (name, index or -1)).

``show_*`` methods turn results into layers with :mod:`.convert`; call them on the main thread.

Where features go: ``~/.cache/napari-gpfm/features`` by default (:func:`default_out_dir`),
because slides often sit on read-only shares and the bundled sample lives inside the package;
the dock lets the user choose another folder (e.g. next to the slides).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..analyses.clusters import ClusterResult, cluster_table, kmeans
from ..analyses.heatmap import PatchGrid, Raster, heatmap_raster, labels_raster, patch_grid
from ..analyses.similarity import MultiStoreIndex, SimilarityIndex
from . import convert
from .reader import layer_slide

__all__ = [
    "Explorer",
    "SimilarityResult",
    "SlideSession",
    "default_out_dir",
    "explorer_for",
    "find_finished_store",
    "preview_tissue",
    "weights_digest",
]

HEATMAP_LABELS = {
    "similarity": "cosine similarity to the query",
    "distance_to_centre": "distance to cluster centre",
    "tissue_fraction": "tissue fraction",
}


def default_out_dir() -> Path:
    """``$NAPARI_GPFM_FEATURES_DIR`` or ``~/.cache/napari-gpfm/features``."""
    env = os.environ.get("NAPARI_GPFM_FEATURES_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/napari-gpfm/features").expanduser()


# ------------------------------------------------------------------------- store look-up
_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(card: Any, allow_random: bool = False, seed: int = 0) -> str | None:
    """The ``weights_sha256`` a run with ``card`` would record, without loading the model.

    The card's recorded sha256 when known, else the file's (hashed once per session and file
    version), ``random-init-seed-<seed>`` for random weights, ``None`` when no weights exist.
    """
    status = card.status()
    if not status.found:
        return f"random-init-seed-{seed}" if allow_random else None
    if card.weights.sha256:
        return str(card.weights.sha256)
    path = Path(status.path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        from ..encoders import sha256_file

        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def find_finished_store(
    slide: Any,
    card: Any,
    spec: Any,
    tissue_params: Any,
    out_dir: str | Path,
    allow_random: bool = False,
) -> Any | None:
    """The finished store of ``slide`` under exactly this recipe, or ``None`` (no model load).

    Lets the dock load an already embedded slide instantly instead of starting a run.
    """
    from ..embeddings import StoreError, open_store, store_path
    from ..embeddings.run import make_recipe

    digest = weights_digest(card, allow_random)
    if digest is None or slide.mpp is None:
        return None
    recipe = make_recipe(SimpleNamespace(card=card, weights_sha256=digest), slide, spec,
                         tissue_params)  # fmt: skip
    path = store_path(out_dir, card.name, slide.name)
    if not path.exists():
        return None
    try:
        return open_store(path, expected_recipe=recipe)
    except StoreError:
        return None


def preview_tissue(slide: Any, spec: Any, tissue_params: Any, encoder_input: int | None = None):
    """Tissue mask and the grid an embed run would use: ``(TissueMask, TileGrid)``."""
    from ..tiles import detect_tissue, make_grid

    tissue = detect_tissue(slide, tissue_params)
    grid = make_grid(slide, spec, tissue, encoder_input=encoder_input)
    return tissue, grid


# ------------------------------------------------------------------------------ sessions
@dataclass
class SimilarityResult:
    """Scores of every patch of every compatible slide to a query, and the best hits."""

    query_slide: str
    query: np.ndarray  # patch indices on query_slide
    scores: dict[str, np.ndarray]
    hits: list[tuple[str, int, float]]  # (slide, index, score), best first, queries excluded


class SlideSession:
    """One slide layer with its feature store, patch grid and analysis results.

    ``offset`` is the slide layer's ``translate`` (y, x) in world units; usually zero.
    """

    def __init__(self, name: str, slide: Any, store: Any, offset: Sequence[float] = (0.0, 0.0),
                 index: SimilarityIndex | None = None):  # fmt: skip
        if store.coords is None:
            raise ValueError(f"{store.path}: the feature file has no patch coordinates")
        psize = store.patch_size_level0
        if psize is None:
            raise ValueError(f"{store.path}: the feature file does not record patch_size_level0")
        self.name = name
        self.slide = slide
        self.store = store
        self.offset = (float(offset[0]), float(offset[1]))
        self.mpp = slide.mpp if slide is not None and slide.mpp is not None else store.mpp
        self.coords = np.asarray(store.coords, dtype=np.int64)
        self.patch_size_level0 = int(psize)
        self.grid: PatchGrid = patch_grid(self.coords, self.patch_size_level0, self.mpp)
        self.model = store.model
        self.clusters: ClusterResult | None = None
        self.values: dict[str, np.ndarray] = {}
        self.projections: dict[str, np.ndarray] = {}
        self.selection = np.zeros(self.n, dtype=bool)
        self._index: SimilarityIndex | None = index

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    @property
    def features(self) -> np.ndarray:
        return self.store.features

    @property
    def index(self) -> SimilarityIndex:
        if self._index is None:
            self._index = SimilarityIndex(self.features, model=self.model, name=self.name)
        return self._index

    # --- analyses ------------------------------------------------------------------------
    def cluster(self, k: int, seed: int = 0) -> ClusterResult:
        res = kmeans(self.features, k, seed=seed)
        self.set_clusters(res)
        return res

    def set_clusters(self, res: ClusterResult) -> None:
        self.clusters = res
        self.values["cluster"] = res.labels
        self.values["distance_to_centre"] = res.distances

    def cluster_rows(self) -> list[dict]:
        if self.clusters is None:
            return []
        return cluster_table(self.clusters.labels, self.patch_size_level0, self.mpp, self.grid)

    def project(self, method: str = "pca", seed: int = 0) -> np.ndarray:
        """(N, 2) PCA or UMAP coordinates (cached per method)."""
        if method not in self.projections:
            from ..analyses.clusters import pca, umap

            fn = {"pca": pca, "umap": umap}[method]
            self.projections[method] = fn(self.features, 2, seed=seed)
        return self.projections[method]

    # --- geometry --------------------------------------------------------------------------
    def patch_at(self, world_yx: Sequence[float] | np.ndarray) -> int | np.ndarray:
        """Patch index under world point(s) (y, x), -1 where none."""
        w = np.asarray(world_yx, dtype=np.float64) - np.asarray(self.offset)
        return self.grid.patch_index_at(w)

    def boxes(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return convert.patch_boxes_world(self.coords[idx], self.patch_size_level0, self.mpp,
                                         self.offset)  # fmt: skip

    def centre(self, index: int) -> tuple[float, float]:
        return convert.patch_centre_world(self.coords[index], self.patch_size_level0, self.mpp,
                                          self.offset)  # fmt: skip

    def heatmap(self, key: str) -> Raster:
        return heatmap_raster(self.values[key], self.grid)

    def labels(self) -> Raster:
        if self.clusters is None:
            raise ValueError(f"{self.name}: run clustering first")
        return labels_raster(self.clusters.labels, self.grid)

    def columns(self) -> dict[str, np.ndarray]:
        """Per-patch columns for export (cluster, distances, similarity...)."""
        return {k: np.asarray(v) for k, v in self.values.items()}

    # --- export ----------------------------------------------------------------------------
    def export(self, out_dir: str | Path, what: Sequence[str] = ("png", "table", "geojson")
               ) -> list[Path]:  # fmt: skip
        """Write the results present: heatmap/cluster PNG overlays (+ JSON sidecars), the
        per-patch table (Parquet with pyarrow, else CSV) and QuPath GeoJSON (one detection per
        patch, and merged cluster polygons with measurements). Returns the files written."""
        from ..analyses.export import write_csv, write_heatmap_png, write_parquet
        from ..annotations.geojson import class_polygons, patch_features, write_geojson

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = self.name
        written: list[Path] = []
        k = 0 if self.clusters is None else int(self.clusters.labels.max()) + 1
        palette = convert.cluster_colours(max(k, 1))
        names = [f"Cluster {i}" for i in range(k)]
        if "png" in what:
            for key in self.values:
                if key == "cluster":
                    continue
                p = out / f"{stem}_{key}.png"
                write_heatmap_png(p, self.heatmap(key))
                written += [p, Path(str(p) + ".json")]
            if self.clusters is not None:
                lab = self.labels()
                data = np.where(lab.data > 0, lab.data - 1, np.nan).astype(np.float32)
                lut_idx = np.round(np.arange(256) / 255 * max(k - 1, 0)).astype(int)
                p = out / f"{stem}_clusters.png"
                write_heatmap_png(p, Raster(data, lab.grid), vmin=0, vmax=max(k - 1, 1e-9),
                                  cmap=palette[lut_idx])  # fmt: skip
                written += [p, Path(str(p) + ".json")]
        if "table" in what:
            import importlib.util

            if importlib.util.find_spec("pyarrow") is not None:
                p = out / f"{stem}_patches.parquet"
                write_parquet(p, self.coords, self.columns())
            else:
                p = out / f"{stem}_patches.csv"
                write_csv(p, self.coords, self.columns())
            written.append(p)
        if "geojson" in what:
            meas = {k_: v for k_, v in self.columns().items() if k_ != "cluster"}
            labels = None if self.clusters is None else self.clusters.labels
            feats = patch_features(self.coords, self.patch_size_level0, meas, labels,
                                   names or None, palette[:, :3] if k else None)  # fmt: skip
            p = out / f"{stem}_patches.geojson"
            write_geojson(p, feats)
            written.append(p)
            if self.clusters is not None:
                polys = class_polygons(self.labels(), names, palette[:, :3])
                rows = {r["cluster"]: r for r in self.cluster_rows()}
                for ann in polys:
                    cid = names.index(ann.class_name)
                    r = rows[cid]
                    area_key = "area_um2" if "area_um2" in r else "area_px2"
                    ann.properties["measurements"] = {
                        "patches": r["count"], "fraction": r["fraction"], area_key: r[area_key],
                    }  # fmt: skip
                p = out / f"{stem}_clusters.geojson"
                write_geojson(p, polys)
                written.append(p)
        return written


# ------------------------------------------------------------------------------ explorer
class Explorer:
    """Sessions of one viewer, the analyses across them and their layers."""

    def __init__(self, viewer: Any = None):
        from napari.utils.events import EmitterGroup

        self._viewer_ref = weakref.ref(viewer) if viewer is not None else None
        self.sessions: dict[str, SlideSession] = {}
        self.last_similarity: SimilarityResult | None = None
        self.events = EmitterGroup(
            source=self, sessions=None, clusters=None, similarity=None, selection=None, hover=None
        )

    @property
    def viewer(self) -> Any:
        return self._viewer_ref() if self._viewer_ref is not None else None

    # --- sessions --------------------------------------------------------------------------
    def add(self, layer: Any, store: Any, index: SimilarityIndex | None = None) -> SlideSession:
        """Attach a loaded feature store (and its prebuilt similarity index, if any) to a slide
        layer, replacing an earlier one."""
        slide = layer_slide(layer)
        offset = tuple(np.asarray(layer.translate, dtype=float)[-2:])
        session = SlideSession(layer.name, slide, store, offset, index=index)
        self.sessions[layer.name] = session
        self.events.sessions(value=layer.name)
        return session

    def get(self, name: str) -> SlideSession:
        if name not in self.sessions:
            raise KeyError(f"no embeddings loaded for {name!r}: compute or load them first")
        return self.sessions[name]

    def compatible(self, name: str) -> list[SlideSession]:
        """Sessions whose embeddings are comparable with ``name``'s (same model and dim)."""
        ref = self.get(name)
        dim = ref.store.embed_dim
        return [s for s in self.sessions.values()
                if s.model == ref.model and s.store.embed_dim == dim]  # fmt: skip

    # --- analyses --------------------------------------------------------------------------
    def cluster(self, name: str, k: int, seed: int = 0) -> SlideSession:
        """Run k-means on ``name`` now (see :meth:`set_clusters` for results computed
        elsewhere, e.g. in a worker thread)."""
        return self.set_clusters(name, kmeans(self.get(name).features, k, seed=seed))

    def set_clusters(self, name: str, result: ClusterResult) -> SlideSession:
        session = self.get(name)
        session.set_clusters(result)
        self.events.clusters(value=name)
        return session

    def similarity(self, name: str, indices: Sequence[int] | int, k: int = 10) -> SimilarityResult:
        """Cosine similarity of every patch of every compatible slide to the query patches."""
        idx = np.unique(np.atleast_1d(np.asarray(indices, dtype=np.int64)))
        idx = idx[idx >= 0]
        if idx.size == 0:
            raise ValueError("no patch under the query point(s)")
        peers = self.compatible(name)
        multi = MultiStoreIndex({s.name: s.index for s in peers})
        scores = multi.query({name: idx})
        hits = multi.top_k(scores, k, exclude={name: idx})
        for s in peers:
            s.values["similarity"] = scores[s.name]
        result = SimilarityResult(name, idx, scores, hits)
        self.last_similarity = result
        self.events.similarity(value=result)
        return result

    def select(self, name: str, indices: Sequence[int] | np.ndarray) -> None:
        session = self.get(name)
        mask = np.zeros(session.n, dtype=bool)
        mask[np.asarray(indices, dtype=np.int64)] = True
        session.selection = mask
        self.events.selection(value=(name, np.flatnonzero(mask)))

    def hover(self, name: str, index: int) -> None:
        self.events.hover(value=(name, int(index)))

    # --- layers (main thread) -------------------------------------------------------------
    def _upsert(self, layer_data: convert.LayerData) -> Any:
        viewer = self.viewer
        if viewer is None:
            raise RuntimeError("this explorer has no viewer to show layers in")
        return convert.upsert_layer(viewer, layer_data)

    def show_clusters(self, name: str, opacity: float = 0.5) -> Any:
        s = self.get(name)
        k = int(s.clusters.labels.max()) + 1
        ld = convert.labels_layer_data(s.labels(), f"{name} clusters",
                                       colours=convert.cluster_colours(k), opacity=opacity,
                                       offset=s.offset, slide=name)  # fmt: skip
        return self._upsert(ld)

    def show_heatmap(self, name: str, key: str, *, colormap: str = "viridis",
                     opacity: float = 0.6, contrast_limits=None) -> Any:  # fmt: skip
        s = self.get(name)
        ld = convert.heatmap_layer_data(
            s.heatmap(key), f"{name} {key.replace('_', ' ')}", colormap=colormap,
            contrast_limits=contrast_limits, opacity=opacity, offset=s.offset, slide=name,
            metadata={"value": key},
        )
        return self._upsert(ld)

    def show_similarity(self, result: SimilarityResult, colormap: str = "inferno",
                        opacity: float = 0.65) -> list[Any]:  # fmt: skip
        """A similarity heatmap per compatible slide (common contrast limits) and the top hits
        outlined on each slide."""
        allv = np.concatenate([v for v in result.scores.values()])
        lo, hi = float(np.nanmin(allv)), float(np.nanmax(allv))
        layers = []
        for name in result.scores:
            layers.append(self.show_heatmap(name, "similarity", colormap=colormap,
                                            opacity=opacity, contrast_limits=(lo, hi if hi > lo
                                                                              else lo + 1)))
            s = self.get(name)
            mine = [(i, sc) for n, i, sc in result.hits if n == name]
            idx = np.array([i for i, _ in mine], dtype=np.int64)
            q = result.query if name == result.query_slide else np.empty(0, np.int64)
            if len(idx) or len(q):
                ld = convert.top_hits_layer_data(
                    s.boxes(idx), np.array([sc for _, sc in mine]), f"{name} top hits",
                    query_boxes=s.boxes(q) if len(q) else None, slide=name,
                    units=convert.MICROMETRE if s.mpp is not None else convert.PIXEL,
                )
                layers.append(self._upsert(ld))
            elif f"{name} top hits" in self.viewer.layers:
                self.viewer.layers.remove(f"{name} top hits")
        return layers

    def show_selection(self, name: str) -> Any:
        s = self.get(name)
        ld = convert.mask_layer_data(s.grid, s.selection, f"{name} selection", offset=s.offset,
                                     slide=name)  # fmt: skip
        return self._upsert(ld)

    def show_tissue(self, name: str, tissue: Any, grid: Any, offset=(0.0, 0.0)) -> list[Any]:
        """Tissue mask and the patch grid an embed run would use (before any run)."""
        slide = self.viewer.layers[name]
        mpp = layer_slide(slide).mpp
        out = [self._upsert(convert.tissue_layer_data(tissue.mask, tissue.downsample, mpp,
                                                      f"{name} tissue", offset=offset,
                                                      slide=name))]  # fmt: skip
        if len(grid):
            pg = patch_grid(grid.coords, grid.patch_size_level0, mpp)
            out.append(self._upsert(convert.patch_grid_layer_data(pg, f"{name} patches",
                                                                  offset=offset, slide=name)))
        return out


_EXPLORERS: dict[int, tuple[weakref.ref, Explorer]] = {}


def explorer_for(viewer: Any) -> Explorer:
    """The one :class:`Explorer` of ``viewer`` (created on first use)."""
    key = id(viewer)
    entry = _EXPLORERS.get(key)
    if entry is not None and entry[0]() is viewer:
        return entry[1]
    for k in [k for k, (ref, _) in _EXPLORERS.items() if ref() is None]:
        del _EXPLORERS[k]
    explorer = Explorer(viewer)
    _EXPLORERS[key] = (weakref.ref(viewer), explorer)
    return explorer

