"""The application session behind every dock of one napari window. No Qt here.

**One session per window.** :func:`session_for` returns the one :class:`ViewerSession` of a
viewer, however many proxies of it napari hands the docks: napari's plugin menu gives each
dock a ``PublicOnlyProxy`` (a ``wrapt`` object proxy) of the viewer, so the session is keyed by
the object behind the proxy, reached through the standard ``__wrapped__`` attribute that
``wrapt`` (like :func:`functools.wraps` and :func:`inspect.unwrap`) exposes.

**Per slide** (keyed by the slide layer's ``unique_id``, so renames do not lose it) a
:class:`SlideState` holds the slide, its feature store, patch grid, similarity index,
clusters, heatmap values, projections, selection and predictions. The session follows the
layer list: a slide layer that appears gets a state, a renamed one keeps it (its result layers
are renamed along), a moved one (``translate``) moves its result layers, and a removed one
cancels its running jobs (callbacks registered with :meth:`ViewerSession.register_job`) and is
forgotten. Shared by all docks: the class palette, the output (project) folder, the current
classifiers and the last similarity query.

**Evented** like napari's own models (``session.events.<name>.connect(cb)``; ``event.value``):

- ``slides``: a slide layer was added, renamed or removed (uid);
- ``store``: a feature store was attached to a slide (uid);
- ``clusters``: k-means ran on a slide (uid);
- ``similarity``: a query finished (:class:`SimilarityResult`);
- ``selection``: patches were selected (uid, indices);
- ``hover``: the patch under the mouse changed (uid or -1, index or -1);
- ``prediction``: a classifier painted a slide ((uid, source));
- ``classifier``: the current classifier of a kind changed (source);
- ``out_dir``: the output folder changed.
- ``models``: the model registry changed (a finetuned student was exported).

Results other plugins and scripts should see are also published as plain data where napari
keeps them: the slide layer's ``metadata["napari_gpfm"]["results"]`` (store path, model,
patches, clusters, classes) and each result layer's ``metadata["napari_gpfm"]`` (kind, slide
uid and name) and, for class and cluster maps, ``layer.features`` (one row per label).

``show_*`` methods turn results into layers with :mod:`.convert`; call them on the main thread.

Features go to ``~/.cache/napari-gpfm/features`` by default (:func:`default_out_dir`), because
slides often sit on read-only shares and the bundled sample lives inside the package.
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..analyses.clusters import ClusterResult, cluster_table
from ..analyses.heatmap import PatchGrid, Raster, heatmap_raster, labels_raster, patch_grid
from ..analyses.similarity import MultiStoreIndex, SimilarityIndex
from ..annotations.classes import ClassPalette
from . import convert
from .reader import layer_slide

__all__ = [
    "HEATMAP_LABELS",
    "SimilarityResult",
    "SlideState",
    "ViewerSession",
    "default_out_dir",
    "real_viewer",
    "result_name",
    "session_for",
]

HEATMAP_LABELS = {
    "similarity": "cosine similarity to the query",
    "distance_to_centre": "distance to cluster centre",
    "tissue_fraction": "tissue fraction",
}
META = convert.META_KEY


def default_out_dir() -> Path:
    """``$NAPARI_GPFM_FEATURES_DIR`` or ``~/.cache/napari-gpfm/features``."""
    env = os.environ.get("NAPARI_GPFM_FEATURES_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/napari-gpfm/features").expanduser()


def result_name(slide_name: str, what: str) -> str:
    """Name of a result layer: ``"<slide> · <what>"``."""
    return f"{slide_name} · {what}"


def is_slide_layer(layer: Any) -> bool:
    """A layer opened by napari-gpfm's reader (a live Slide behind it)."""
    slide = layer_slide(layer)
    return slide is not None and not isinstance(slide, str)


# ------------------------------------------------------------------------------ slides
@dataclass
class SimilarityResult:
    """Scores of every patch of every compatible slide to a query, and the best hits.

    Slides are keyed by uid; ``names`` gives their layer names at query time."""

    query_slide: int
    query: np.ndarray  # patch indices on query_slide
    scores: dict[int, np.ndarray]
    hits: list[tuple[int, int, float]]  # (slide uid, index, score), best first, queries excluded
    names: dict[int, str]


class SlideState:
    """One slide layer: the slide, and (once attached) its feature store and analyses."""

    def __init__(self, layer: Any):
        self.uid = int(layer.unique_id)
        self._layer = weakref.ref(layer)
        self.slide = layer_slide(layer)
        self.store: Any = None
        self.coords = np.zeros((0, 2), np.int64)
        self.patch_size_level0 = 0
        self.grid: PatchGrid | None = None
        self.model: str | None = None
        self.clusters: ClusterResult | None = None
        self.values: dict[str, np.ndarray] = {}
        self.projections: dict[str, np.ndarray] = {}
        self.selection = np.zeros(0, dtype=bool)
        self.predictions: dict[str, Any] = {}
        self._index: SimilarityIndex | None = None

    # --- the layer ----------------------------------------------------------------------
    @property
    def layer(self) -> Any:
        return self._layer()

    @property
    def name(self) -> str:
        layer = self.layer
        return layer.name if layer is not None else self.slide.name

    @property
    def offset(self) -> tuple[float, float]:
        layer = self.layer
        if layer is None:
            return (0.0, 0.0)
        t = np.asarray(layer.translate, dtype=float)[-2:]
        return (float(t[0]), float(t[1]))

    @property
    def mpp(self) -> float | None:
        layer = self.layer
        slide = layer_slide(layer) if layer is not None else None
        if slide is not None and not isinstance(slide, str):
            self.slide = slide  # follows Slide info's pixel-size override
        if self.slide is not None and self.slide.mpp is not None:
            return float(self.slide.mpp)
        return None if self.store is None else self.store.mpp

    # --- the store ----------------------------------------------------------------------
    @property
    def has_store(self) -> bool:
        return self.store is not None

    def attach(self, store: Any, index: SimilarityIndex | None = None) -> None:
        """Use ``store`` (a finished feature store of this slide); earlier results are reset."""
        if store.coords is None:
            raise ValueError(f"{store.path}: the feature file has no patch coordinates")
        psize = store.patch_size_level0
        if psize is None:
            raise ValueError(f"{store.path}: the feature file does not record patch_size_level0")
        self.store = store
        self.coords = np.asarray(store.coords, dtype=np.int64)
        self.patch_size_level0 = int(psize)
        self.model = store.model
        self.grid = patch_grid(self.coords, self.patch_size_level0, self.mpp)
        self.clusters = None
        self.values = {}
        self.projections = {}
        self.selection = np.zeros(self.n, dtype=bool)
        self.predictions = {}
        self._index = index

    def require_store(self) -> Any:
        if self.store is None:
            raise LookupError(f"{self.name}: no embeddings yet. Compute them in the GPFM dock "
                              "(Plugins > napari-gpfm > GPFM) first.")  # fmt: skip
        return self.store

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    @property
    def features(self) -> np.ndarray:
        return self.require_store().features

    @property
    def index(self) -> SimilarityIndex:
        if self._index is None:
            self._index = SimilarityIndex(self.features, model=self.model, name=self.name)
        return self._index

    # --- analyses ------------------------------------------------------------------------
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
        if self.grid is None:
            return np.full(w.shape[:-1], -1, np.int64) if w.ndim > 1 else -1
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

    # --- gallery (issue 13)
    @property
    def index_ready(self) -> bool:
        """The similarity index is built: a query reads no features (else build it off the
        main thread by reading :attr:`index` in a worker)."""
        return self._index is not None


# ------------------------------------------------------------------------------ session
class ViewerSession:
    """Everything the docks of one napari window share; see the module docstring."""

    def __init__(self, viewer: Any):
        from napari.utils.events import EmitterGroup

        self._viewer_ref = weakref.ref(viewer)
        self.slides: dict[int, SlideState] = {}
        self.palette = ClassPalette()
        self.out_dir: Path = default_out_dir()
        self.classifiers: dict[str, Any] = {}
        self.last_similarity: SimilarityResult | None = None
        self._jobs: dict[int, dict[int, Callable[[], None]]] = {}
        self._job_ids = 0
        self._watched: dict[int, tuple[Any, Callable, Callable]] = {}
        self.events = EmitterGroup(
            source=self, slides=None, store=None, clusters=None, similarity=None,
            selection=None, hover=None, prediction=None, classifier=None, out_dir=None,
            models=None,
        )  # fmt: skip
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.events.removed.connect(self._on_removed)
        for layer in list(viewer.layers):
            self._track(layer)

    @property
    def viewer(self) -> Any:
        return self._viewer_ref()

    # --- following the layer list ------------------------------------------------------
    def _on_inserted(self, event: Any) -> None:
        if self._track(event.value):
            self.events.slides(value=int(event.value.unique_id))

    def _track(self, layer: Any) -> bool:
        if not is_slide_layer(layer):
            return False
        uid = int(layer.unique_id)
        if uid in self.slides:
            return False
        self.slides[uid] = SlideState(layer)
        ref = weakref.ref(layer)  # the session never keeps a layer (or its viewer) alive
        old = {"name": layer.name, "translate": np.asarray(layer.translate, float)[-2:].copy()}

        def renamed(event: Any = None, uid: int = uid) -> None:
            la = ref()
            if la is None:
                return
            self._rename_results(uid, old["name"], la.name)
            old["name"] = la.name
            self.events.slides(value=uid)

        def moved(event: Any = None, uid: int = uid) -> None:
            la = ref()
            if la is None:
                return
            t = np.asarray(la.translate, float)[-2:]
            self._move_results(uid, t - old["translate"])
            old["translate"] = t.copy()

        layer.events.name.connect(renamed)
        layer.events.translate.connect(moved)
        self._watched[uid] = (ref, renamed, moved)
        return True

    def _on_removed(self, event: Any) -> None:
        uid = int(event.value.unique_id)
        if uid not in self.slides:
            return
        self.cancel_jobs(uid)
        ref, renamed, moved = self._watched.pop(uid)
        layer = ref()
        if layer is not None:
            layer.events.name.disconnect(renamed)
            layer.events.translate.disconnect(moved)
        del self.slides[uid]
        if self.last_similarity is not None and uid in self.last_similarity.scores:
            self.last_similarity = None
        self.events.slides(value=uid)

    def result_layers(self, uid: int) -> list[Any]:
        """The result layers (heatmaps, maps, hits, previews) made for slide ``uid``."""
        out = []
        for la in self.viewer.layers:
            meta = la.metadata.get(META) if isinstance(la.metadata, dict) else None
            if isinstance(meta, dict) and meta.get("slide_uid") == uid:
                out.append(la)
        return out

    def _rename_results(self, uid: int, old: str, new: str) -> None:
        prefix = result_name(old, "")
        for la in self.result_layers(uid):
            if la.name.startswith(prefix):
                la.name = result_name(new, la.name[len(prefix):])
            la.metadata[META]["slide_layer"] = new

    def _move_results(self, uid: int, delta: np.ndarray) -> None:
        for la in self.result_layers(uid):
            t = np.asarray(la.translate, float)
            t[-2:] += delta
            la.translate = t

    # --- look-ups ------------------------------------------------------------------------
    def slide(self, key: int | str | Any) -> SlideState:
        """The state of a slide by uid, layer name or layer; ``LookupError`` when unknown."""
        if isinstance(key, uuid.UUID):  # a layer's unique_id as napari gives it
            key = int(key)
        if isinstance(key, (int, np.integer)) and int(key) in self.slides:
            return self.slides[int(key)]
        if isinstance(key, str):
            for s in self.slides.values():
                if s.name == key:
                    return s
        uid = getattr(key, "unique_id", None)
        if uid is not None and int(uid) in self.slides:
            return self.slides[int(uid)]
        raise LookupError(f"{key!r} is not a slide layer opened by napari-gpfm")

    def get(self, key: int | str | Any) -> SlideState:
        """Like :meth:`slide`, but the slide must have a feature store."""
        s = self.slide(key)
        s.require_store()
        return s

    def embedded(self) -> list[SlideState]:
        """Slides with a feature store, in layer order."""
        return [s for s in self.slides.values() if s.has_store]

    def names(self) -> dict[int, str]:
        return {uid: s.name for uid, s in self.slides.items()}

    # --- output folder and stores ------------------------------------------------------
    def set_out_dir(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        if path != self.out_dir:
            self.out_dir = path
            self.events.out_dir(value=str(path))

    def attach_store(self, key: Any, store: Any, index: SimilarityIndex | None = None
                     ) -> SlideState:  # fmt: skip
        """Use a finished feature store for a slide (every dock sees it at once)."""
        s = self.slide(key)
        s.attach(store, index)
        self._publish(s)
        self.events.store(value=s.uid)
        return s

    def use_store_file(self, key: Any, path: str | Path) -> Any:
        """Attach the feature file at ``path`` to a slide (checked against the slide's
        fingerprint: another file's features are refused, naming both)."""
        from ..embeddings import open_store

        s = self.slide(key)
        store = open_store(path, expected_slide=s.slide)
        self.attach_store(s.uid, store)
        return store

    def find_store(self, key: Any, model: str | None = None) -> Any | None:
        """The slide's store: the attached one, else the newest finished store of this slide
        (same file: checked by fingerprint) in the output folder (of ``model`` when given),
        which is then attached. ``None`` when there is none."""
        from ..embeddings import StoreError, open_store

        s = self.slide(key)
        if s.store is not None and (model is None or s.model == model):
            return s.store
        from glob import escape

        from ..embeddings.store import safe_name

        folder = f"features_{escape(safe_name(model))}" if model else "features_*"
        pattern = f"*/{folder}/{escape(s.slide.name)}.h5"
        candidates = sorted(self.out_dir.glob(pattern), key=os.path.getmtime, reverse=True)
        for path in candidates:
            try:
                store = open_store(path, expected_slide=s.slide)
            except (StoreError, OSError, ValueError):
                continue
            self.attach_store(s.uid, store)
            return store
        return None

    def _publish(self, s: SlideState) -> None:
        """Plain-data results on the slide layer's metadata, for other plugins and scripts."""
        layer = s.layer
        if layer is None:
            return
        meta = dict(layer.metadata.get(META, {}))
        results: dict[str, Any] = {}
        if s.store is not None:
            results.update(store=str(s.store.path), model=s.model, n_patches=s.n,
                           patch_size_level0=s.patch_size_level0)  # fmt: skip
        if s.clusters is not None:
            results["clusters"] = int(s.clusters.labels.max()) + 1
        if s.predictions:
            results["predictions"] = {k: list(v[1]) for k, v in s.predictions.items()}
        meta["results"] = results
        layer.metadata = {**layer.metadata, META: meta}

    # --- jobs ------------------------------------------------------------------------------
    def register_job(self, key: Any, cancel: Callable[[], None]) -> int:
        """Remember how to cancel a job working on a slide; returns a token for
        :meth:`job_done`. Removing the slide layer calls ``cancel``."""
        uid = self.slide(key).uid
        self._job_ids += 1
        self._jobs.setdefault(uid, {})[self._job_ids] = cancel
        return self._job_ids

    def job_done(self, token: int) -> None:
        for jobs in self._jobs.values():
            jobs.pop(token, None)

    def cancel_jobs(self, uid: int) -> int:
        jobs = self._jobs.pop(uid, {})
        for cancel in jobs.values():
            cancel()
        return len(jobs)

    # --- analyses --------------------------------------------------------------------------
    def compatible(self, key: Any) -> list[SlideState]:
        """Slides whose embeddings are comparable with ``key``'s (same model and width)."""
        ref = self.get(key)
        dim = ref.store.embed_dim
        return [s for s in self.embedded() if s.model == ref.model and s.store.embed_dim == dim]

    def set_clusters(self, key: Any, result: ClusterResult) -> SlideState:
        s = self.get(key)
        s.set_clusters(result)
        self._publish(s)
        self.events.clusters(value=s.uid)
        return s

    def similarity(self, key: Any, indices: Sequence[int] | int, k: int = 10
                   ) -> SimilarityResult:  # fmt: skip
        """Cosine similarity of every patch of every compatible slide to the query patches.
        Slides of the same model whose finished stores are in the output folder join in."""
        s = self.get(key)
        for other in list(self.slides.values()):
            if not other.has_store and s.model:
                self.find_store(other.uid, s.model)
        idx = np.unique(np.atleast_1d(np.asarray(indices, dtype=np.int64)))
        idx = idx[(idx >= 0) & (idx < s.n)]
        if idx.size == 0:
            raise ValueError("no embedded patch under the query point(s)")
        peers = self.compatible(s.uid)
        multi = MultiStoreIndex({p.uid: p.index for p in peers})
        scores = multi.query({s.uid: idx})
        hits = multi.top_k(scores, k, exclude={s.uid: idx})
        for p in peers:
            p.values["similarity"] = scores[p.uid]
        result = SimilarityResult(s.uid, idx, scores, hits, {p.uid: p.name for p in peers})
        self.last_similarity = result
        self.events.similarity(value=result)
        return result

    def select(self, key: Any, indices: Sequence[int] | np.ndarray) -> None:
        s = self.get(key)
        mask = np.zeros(s.n, dtype=bool)
        mask[np.asarray(indices, dtype=np.int64)] = True
        s.selection = mask
        self.events.selection(value=(s.uid, np.flatnonzero(mask)))

    def hover(self, uid: int, index: int) -> None:
        self.events.hover(value=(int(uid), int(index)))

    def set_classifier(self, source: str, classifier: Any) -> None:
        self.classifiers[source] = classifier
        self.events.classifier(value=source)

    def set_prediction(self, key: Any, source: str, rasters: dict, class_names: Sequence[str],
                       colours: Any, label: str | None = None) -> list[Any]:  # fmt: skip
        """Keep a classifier's prediction of a slide and paint it (class map, probabilities,
        uncertainty), aligned with the slide's scale and translate."""
        steps = self.prediction_steps(key, source, rasters, class_names, colours, label)
        return [step() for step in steps][:-1]

    def prediction_steps(self, key: Any, source: str, rasters: dict,
                         class_names: Sequence[str], colours: Any, label: str | None = None
                         ) -> list[Callable[[], Any]]:  # fmt: skip
        """:meth:`set_prediction` as steps of at most one layer each (class map first), for
        the main thread to run one per turn of the event loop: adding a layer costs napari a
        good fraction of a second on a busy machine. The last step records the prediction
        (``prediction`` event); each step returns its layer (the last: ``None``)."""
        from .annotation_layers import prediction_layer_data

        s = self.slide(key)
        uid = s.uid
        value = (rasters, list(class_names), colours)
        prefix = result_name(s.name, label or source)
        items = prediction_layer_data(rasters, class_names, colours, prefix, offset=s.offset)
        for data in items:
            data[1]["metadata"][META]["slide_uid"] = uid
            data[1]["metadata"][META]["source"] = source
            if data[1]["metadata"][META].get("kind") == "class-map":
                data[1]["features"] = {"index": np.arange(len(class_names) + 1),
                                       "class": ["none", *class_names]}

        def add(data: Any) -> Callable[[], Any]:
            return lambda: self._upsert(data) if uid in self.slides else None

        def record() -> None:
            state = self.slides.get(uid)
            if state is None:
                return
            state.predictions[source] = value
            self._publish(state)
            self.events.prediction(value=(uid, source))

        return [add(d) for d in items] + [record]

    # --- layers (main thread) -------------------------------------------------------------
    def _upsert(self, layer_data: convert.LayerData) -> Any:
        viewer = self.viewer
        if viewer is None:
            raise RuntimeError("this session's viewer is gone")
        return convert.upsert_layer(viewer, layer_data)

    def _meta(self, s: SlideState, data: convert.LayerData) -> convert.LayerData:
        data[1]["metadata"][META]["slide_uid"] = s.uid
        data[1]["metadata"][META]["slide_layer"] = s.name
        return data

    def show_clusters(self, key: Any, opacity: float = 0.5) -> Any:
        s = self.get(key)
        k = int(s.clusters.labels.max()) + 1
        ld = convert.labels_layer_data(s.labels(), result_name(s.name, "clusters"),
                                       colours=convert.cluster_colours(k), opacity=opacity,
                                       offset=s.offset, slide=s.name)  # fmt: skip
        ld[1]["features"] = {"index": np.arange(k + 1),
                             "cluster": ["none"] + [f"Cluster {i}" for i in range(k)]}
        return self._upsert(self._meta(s, ld))

    def show_heatmap(self, key: Any, value: str, *, colormap: str = "viridis",
                     opacity: float = 0.6, contrast_limits=None) -> Any:  # fmt: skip
        s = self.get(key)
        ld = convert.heatmap_layer_data(
            s.heatmap(value), result_name(s.name, value.replace("_", " ")), colormap=colormap,
            contrast_limits=contrast_limits, opacity=opacity, offset=s.offset, slide=s.name,
            metadata={"value": value},
        )
        return self._upsert(self._meta(s, ld))

    def show_similarity(self, result: SimilarityResult, colormap: str = "inferno",
                        opacity: float = 0.65) -> list[Any]:  # fmt: skip
        """A similarity heatmap per compatible slide (common contrast limits) and the top hits
        outlined on each slide."""
        allv = np.concatenate([v for v in result.scores.values()])
        lo, hi = float(np.nanmin(allv)), float(np.nanmax(allv))
        layers = []
        for uid in result.scores:
            if uid not in self.slides:
                continue  # removed since the query
            layers.append(self.show_heatmap(uid, "similarity", colormap=colormap,
                                            opacity=opacity,
                                            contrast_limits=(lo, hi if hi > lo else lo + 1)))
            hits = self.show_top_hits(result, uid)
            if hits is not None:
                layers.append(hits)
        return layers

    def show_top_hits(self, result: SimilarityResult, key: Any) -> Any:
        """The query's best hits on one slide outlined and ranked (the query patches in cyan
        on the query's slide); the layer, or ``None`` (an old one removed) when the slide holds
        neither."""
        s = self.get(key)
        mine = [(i, sc) for u, i, sc in result.hits if u == s.uid]
        idx = np.array([i for i, _ in mine], dtype=np.int64)
        q = result.query if s.uid == result.query_slide else np.empty(0, np.int64)
        name = result_name(s.name, "top hits")
        if len(idx) or len(q):
            ld = convert.top_hits_layer_data(
                s.boxes(idx), np.array([sc for _, sc in mine]), name,
                query_boxes=s.boxes(q) if len(q) else None, slide=s.name,
                units=convert.MICROMETRE if s.mpp is not None else convert.PIXEL,
            )
            return self._upsert(self._meta(s, ld))
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        return None

    def show_selection(self, key: Any) -> Any:
        s = self.get(key)
        ld = convert.mask_layer_data(s.grid, s.selection, result_name(s.name, "selection"),
                                     offset=s.offset, slide=s.name)  # fmt: skip
        return self._upsert(self._meta(s, ld))

    def show_preview(self, key: Any, tissue: Any, grid: Any) -> list[Any]:
        """Tissue mask and the patch grid an embed run would use (replacing older previews)."""
        s = self.slide(key)
        self.hide_preview(s.uid)
        mpp = s.mpp
        out = [self._upsert(self._meta(s, convert.tissue_layer_data(
            tissue.mask, tissue.downsample, mpp, result_name(s.name, "tissue"),
            offset=s.offset, slide=s.name)))]  # fmt: skip
        if len(grid):
            pg = patch_grid(grid.coords, grid.patch_size_level0, mpp)
            out.append(self._upsert(self._meta(s, convert.patch_grid_layer_data(
                pg, result_name(s.name, "patches"), offset=s.offset, slide=s.name))))
        return out

    def hide_preview(self, key: Any) -> int:
        """Remove the tissue and patch-grid previews of a slide (stale after a recipe change,
        or once results are shown); returns how many layers went."""
        s = self.slide(key)
        gone = 0
        for la in self.result_layers(s.uid):
            if la.metadata[META].get("kind") in ("tissue", "patch-grid"):
                self.viewer.layers.remove(la)
                gone += 1
        return gone

    # --- models (issue 13) ------------------------------------------------------------------
    def models_changed(self, name: str | None = None) -> None:
        """A model card was added or replaced (e.g. a finetuned student was exported): every
        model list refreshes (``models`` event; ``event.value`` the model's name or None)."""
        self.events.models(value=name)


_SESSIONS: dict[int, tuple[weakref.ref, ViewerSession]] = {}


def real_viewer(viewer: Any) -> Any:
    """The viewer behind napari's per-dock ``PublicOnlyProxy`` (itself when not a proxy)."""
    seen = 0
    while hasattr(type(viewer), "__wrapped__") and seen < 8:
        viewer = viewer.__wrapped__
        seen += 1
    return viewer


def session_for(viewer: Any) -> ViewerSession:
    """The one :class:`ViewerSession` of ``viewer``'s window (created on first use), the same
    for the viewer and for every proxy of it napari hands to a dock."""
    real = real_viewer(viewer)
    key = id(real)
    entry = _SESSIONS.get(key)
    if entry is not None and entry[0]() is real:
        return entry[1]
    for k in [k for k, (ref, _) in _SESSIONS.items() if ref() is None]:
        del _SESSIONS[k]
    session = ViewerSession(real)
    _SESSIONS[key] = (weakref.ref(real), session)
    return session
