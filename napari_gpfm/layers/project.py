"""A project: the slides of a study and everything napari-gpfm made for them, in one folder.

As a QuPath project, the **project folder** (the session's output folder,
:attr:`~napari_gpfm.layers.session.ViewerSession.out_dir`) holds everything::

    <project>/project.json                 the session state (this module's format)
    <project>/classes.json                 the class palette (shared with the Annotate dock)
    <project>/<tiling>/features_<model>/   the feature stores (<slide>.h5)
    <project>/annotations/<slide>.geojson  the annotations of each slide (QuPath GeoJSON)
    <project>/clusters/<slide>.npz         k-means results (labels, centres, distances)
    <project>/classifiers/<source>.npz     the current classifier(s): linear probe (.npz) or
    <project>/classifiers/<source>.safetensors   PathoTune (read by jobs.classifiers)
    <project>/paint/<slide>.npz            class-paint Labels layers (cells, classes, cell size)
    <project>/heatmaps/<slide>.npz         per-patch heatmap values (+ colormap and range in
                                           project.json)
    <project>/predictions/<slide>.geojson  "Apply classifier to all" outputs (+ _patches.csv)

``project.json`` also keeps the last similarity query (query slide and patches, the ranked hits
by slide path): its top-hits outlines come back with the similarity heatmaps.

:func:`save_project` writes the session's plain data there; :func:`restore_project` opens a
project in a viewer (slides reopened with napari-gpfm's reader, stores attached, clusters,
classes, annotation and class-paint layers, heatmaps, the current classifiers and their
predictions back). :func:`restore_job` does the same as a job: files read and classifiers
loaded and applied in the worker, each layer added by a main-thread step of its own. Slides listed
but not open (a folder of slides) stay closed and keep their entries.

Long work over many slides is a job (plain generators of :class:`~napari_gpfm.jobs.Progress`,
run by a dock's ``JobPanel``): :func:`scan_job` (thumbnail, mpp and stores of each slide),
:func:`embed_all_job` (drives :func:`~napari_gpfm.jobs.embed.embed_or_load` per slide) and
:func:`apply_all_job` (drives :func:`~napari_gpfm.jobs.probe.apply_job` per slide). Each record's
``data`` is a :class:`SlideStep` naming the slide (its row); a slide that fails is named and
the others go on. No Qt here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NapariGpfmError
from ..jobs.progress import Progress
from .convert import META_KEY as META

__all__ = [
    "PROJECT_FILE",
    "ProjectError",
    "RestoreReport",
    "SlideInfo",
    "SlideStep",
    "annotation_layers",
    "apply_all_job",
    "embed_all_job",
    "find_slides",
    "load_project",
    "read_slide_info",
    "RestoreStep",
    "restore_job",
    "restore_project",
    "same_path",
    "save_project",
    "scan_job",
    "slide_stores",
]

PROJECT_FILE = "project.json"
FORMAT = "napari-gpfm-project/1"
ANNOTATIONS, CLUSTERS, CLASSIFIERS, PREDICTIONS, PAINT, HEATMAPS = (
    "annotations", "clusters", "classifiers", "predictions", "paint", "heatmaps")  # fmt: skip
PLUGIN = "napari-gpfm"
THUMB_SIDE = 96


class ProjectError(NapariGpfmError, ValueError):
    """A project file that cannot be read (the message names the file and the problem)."""


def same_path(path: str | os.PathLike) -> str:
    """The key a slide is known by in a project: its absolute, resolved path."""
    try:
        return str(Path(path).expanduser().resolve())
    except OSError:
        return str(Path(path).expanduser().absolute())


# ------------------------------------------------------------------------------ slides
def find_slides(folder: str | os.PathLike) -> list[Path]:
    """Every whole-slide image directly in ``folder``, by name: the files napari-gpfm's reader
    claims (tiled or pyramidal TIFFs only among ``.tif``) and DICOM folders."""
    from .reader import _is_ours

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    out = []
    for p in sorted(folder.iterdir(), key=lambda q: q.name.lower()):
        if p.name.startswith(".") or p.name.endswith((".partial", ".part")):
            continue
        if _is_ours(p):
            out.append(p)
    return out


@dataclass
class StoreInfo:
    """A finished feature store of a slide in the project folder."""

    path: str
    model: str
    n_patches: int
    tiling: str


@dataclass
class SlideInfo:
    """What reading a slide file gave (plain data); ``problem`` says why it could not be read."""

    path: str
    name: str
    mpp: float | None = None
    mpp_source: str | None = None
    dimensions: tuple[int, int] | None = None
    thumbnail: np.ndarray | None = None
    stores: list[StoreInfo] = field(default_factory=list)
    problem: str | None = None

    @property
    def models(self) -> list[str]:
        return sorted({s.model for s in self.stores})


def slide_stores(out_dir: str | os.PathLike, slide: Any, model: str | None = None
                 ) -> list[StoreInfo]:  # fmt: skip
    """The finished stores of ``slide`` (same file: checked by fingerprint) in ``out_dir``,
    newest first; of ``model`` only when given."""
    from glob import escape

    from ..embeddings import StoreError, open_store
    from ..embeddings.store import safe_name

    folder = f"features_{escape(safe_name(model))}" if model else "features_*"
    pattern = f"*/{folder}/{escape(slide.name)}.h5"
    root = Path(out_dir)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob(pattern), key=os.path.getmtime, reverse=True):
        try:
            store = open_store(path, expected_slide=slide)
        except (StoreError, OSError, ValueError):
            continue
        out.append(StoreInfo(str(path), str(store.model or path.parent.name[9:]),
                             int(store.n_patches), path.parent.parent.name))  # fmt: skip
    return out


def read_slide_info(path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                    slide: Any = None, mpp: float | None = None,
                    thumb_side: int = THUMB_SIDE) -> SlideInfo:  # fmt: skip
    """Name, mpp, a thumbnail and the finished stores (in ``out_dir``) of a slide; never raises
    (an unreadable slide gets its ``problem``). ``slide`` is the open Slide when there is one."""
    from ..slide import open_slide

    path = Path(path)
    info = SlideInfo(same_path(path), path.stem if path.is_file() else path.name)
    own = slide is None
    try:
        if own:
            slide = open_slide(path, mpp=mpp)
        info.name = slide.name
        info.mpp, info.mpp_source = slide.mpp, slide.mpp_source
        info.dimensions = tuple(slide.dimensions)
        info.thumbnail = slide.thumbnail(thumb_side)
        if out_dir is not None:
            info.stores = slide_stores(out_dir, slide)
    except Exception as exc:  # noqa: BLE001 - a listing names a bad slide and goes on
        info.problem = str(exc) or type(exc).__name__
    finally:
        if own and slide is not None:
            slide.close()
    return info


@dataclass
class SlideStep:
    """One slide's part of a many-slide job: ``row`` (its place in the job's list), its name,
    the inner job's record while it runs, then its ``result`` or its ``error`` (in words)."""

    row: int
    name: str
    progress: Progress | None = None
    result: Any = None
    error: str | None = None
    finished: bool = False


def scan_job(items: Sequence[tuple[str, Any, float | None]], out_dir: str | os.PathLike
             ) -> Generator[Progress, None, list[SlideInfo]]:  # fmt: skip
    """Read each slide (``(path, open Slide or None, mpp override or None)``): one record per
    slide whose ``data`` is a finished :class:`SlideStep` holding its :class:`SlideInfo`."""
    n = len(items)
    out: list[SlideInfo] = []
    yield Progress("project", "reading slides", 0, n, status="started", unit="slides",
                   message=f"reading {n} slide(s)…")  # fmt: skip
    for i, (path, slide, mpp) in enumerate(items):
        info = read_slide_info(path, out_dir, slide, mpp)
        out.append(info)
        yield Progress("project", "reading slides", i + 1, n, unit="slides",
                       message=f"{info.name}: {info.problem or 'read'}",
                       data=SlideStep(i, info.name, result=info, error=info.problem,
                                      finished=True))  # fmt: skip
    return out


# ------------------------------------------------------------------------------ jobs
@dataclass
class EmbedItem:
    """A slide to embed: ``key`` (layer uid of an open slide, else its path), its ``name`` and
    ``path``, the open ``slide`` (``None``: opened in the job, with ``mpp``)."""

    key: Any
    name: str
    path: str
    slide: Any = None
    mpp: float | None = None


def _drive(gen: Generator) -> Generator[Progress, None, tuple[Any, str | None]]:
    """Re-yield ``gen``'s records; return ``(result, None)``, or ``(None, error in words)`` when
    it raised (closing this closes ``gen``)."""
    try:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                return stop.value, None
            except Exception as exc:  # noqa: BLE001 - one slide failing never stops the others
                return None, str(exc) or type(exc).__name__
            yield p
    finally:
        gen.close()


def embed_all_job(items: Sequence[EmbedItem], template: Any
                  ) -> Generator[Progress, None, list[SlideStep]]:  # fmt: skip
    """Embed (or load) every slide with the request ``template`` (an
    :class:`~napari_gpfm.jobs.embed.EmbedRequest` whose slide is replaced per item; open slides
    get their similarity index built, closed ones not). Records: ``done`` slides of ``total``;
    ``data`` a :class:`SlideStep` (the slide's own embed record in ``progress``, then its
    :class:`~napari_gpfm.jobs.embed.EmbedOutcome` in ``result`` or its ``error``)."""
    from ..jobs.embed import embed_or_load
    from ..slide import open_slide

    n = len(items)
    steps: list[SlideStep] = []
    yield Progress("project", "embedding", 0, n, status="started", unit="slides",
                   message=f"embedding {n} slide(s)…")  # fmt: skip
    for i, item in enumerate(items):
        step = SlideStep(i, item.name)
        steps.append(step)
        slide, own = item.slide, item.slide is None
        try:
            if own:
                slide = open_slide(item.path, mpp=item.mpp)
        except Exception as exc:  # noqa: BLE001 - named, the others go on
            step.error = str(exc) or type(exc).__name__
        if slide is not None:
            req = dataclasses.replace(template, slide=slide, index=not own)
            try:
                gen = _drive(embed_or_load(req))
                while True:
                    try:
                        p = next(gen)
                    except StopIteration as stop:
                        step.result, step.error = stop.value
                        break
                    yield Progress("project", "embedding", i, n, unit="slides",
                                   message=f"{i + 1}/{n} · {p.message or p.stage}",
                                   data=SlideStep(i, item.name, progress=p))  # fmt: skip
            finally:
                if own:
                    slide.close()
        step.finished = True
        yield Progress("project", "embedding", i + 1, n, unit="slides",
                       message=f"{item.name}: {_outcome_text(step)}", data=step)  # fmt: skip
    return steps


def _outcome_text(step: SlideStep) -> str:
    if step.error is not None:
        return f"failed: {step.error}"
    out = step.result
    if out is None:
        return "done"
    verb = "loaded" if out.loaded else "embedded"
    return f"{verb} ({out.store.n_patches:,} patches, {out.store.model})"


@dataclass
class ApplyItem:
    """A slide to classify: ``store`` known (an open slide's), else found in the job."""

    key: Any
    name: str
    path: str
    store: Any = None
    mpp: float | None = None


def _fitting_store(classifier: Any, out_dir: Path, path: str, mpp: float | None) -> Any:
    """The slide's finished store in ``out_dir`` the classifier fits (else the newest one, whose
    problem ``apply_job`` will name; ``None`` when there is none)."""
    from ..analyses.classify import check_recipe
    from ..embeddings import open_store
    from ..errors import NapariGpfmError
    from ..slide import open_slide

    slide = open_slide(path, mpp=mpp)
    try:
        found = slide_stores(out_dir, slide)
        stores = [open_store(s.path, expected_slide=slide) for s in found]
    finally:
        slide.close()
    for store in stores:
        try:
            check_recipe(classifier, store)
            return store
        except (NapariGpfmError, ValueError):
            continue
    return stores[0] if stores else None


def apply_all_job(classifier: Any, items: Sequence[ApplyItem], out_dir: str | os.PathLike,
                  source: str = "probe", write: bool = True
                  ) -> Generator[Progress, None, list[SlideStep]]:  # fmt: skip
    """Apply ``classifier`` to every slide through :func:`~napari_gpfm.jobs.probe.apply_job`;
    with ``write`` each prediction also goes to ``<out_dir>/predictions/<slide>.geojson`` and
    ``<slide>_patches.csv`` (QuPath can import them). Records as :func:`embed_all_job`'s; a
    step's ``result`` is the slide's ``SlidePrediction``."""
    from ..analyses.classify import write_outputs
    from ..embeddings.store import safe_name
    from ..jobs.probe import apply_job

    out_dir = Path(out_dir)
    n = len(items)
    steps: list[SlideStep] = []
    yield Progress("project", "classifying", 0, n, status="started", unit="slides",
                   message=f"classifying {n} slide(s)…")  # fmt: skip
    for i, item in enumerate(items):
        step = SlideStep(i, item.name)
        steps.append(step)
        store = item.store
        if store is None:
            try:
                store = _fitting_store(classifier, out_dir, item.path, item.mpp)
            except Exception as exc:  # noqa: BLE001 - named, the others go on
                step.error = str(exc) or type(exc).__name__
        if step.error is None:
            results, step.error = yield from _drive(
                apply_job(classifier, [(item.key, item.name, store)]))
            if results:
                r = results[0]
                step.result = r
                if r.problem is not None:
                    step.error = r.problem
                elif write:
                    try:
                        write_outputs(r.prediction, out_dir / PREDICTIONS, tables=("csv",),
                                      name=f"{safe_name(item.name)}")  # fmt: skip
                    except OSError as exc:
                        step.error = f"predicted, but not written: {exc}"
        step.finished = True
        msg = f"{item.name}: " + (f"failed: {step.error}" if step.error else
                                 f"{step.result.prediction.labels.shape[0]:,} patches classified")
        yield Progress("project", "classifying", i + 1, n, unit="slides", message=msg,
                       data=step)  # fmt: skip
    return steps


# ------------------------------------------------------------------------------ layers
def _extent_centre(layer: Any) -> np.ndarray | None:
    try:
        ext = np.asarray(layer.extent.world, dtype=float)[:, -2:]
    except (AttributeError, ValueError, IndexError):
        return None
    if not np.all(np.isfinite(ext)):
        return None
    return ext.mean(axis=0)


def annotation_layers(session: Any, uid: int) -> list[Any]:
    """The Shapes layers holding a slide's annotations: those made for it (tagged with its
    uid) and untagged Shapes layers (napari's own "new shapes layer", an import) lying on it."""
    s = session.slides.get(uid)
    viewer = session.viewer
    if s is None or viewer is None or s.layer is None:
        return []
    out = []
    for la in viewer.layers:
        if type(la).__name__ != "Shapes" or not len(la.data):
            continue
        meta = la.metadata.get(META) if isinstance(la.metadata, dict) else None
        tagged = meta.get("slide_uid") if isinstance(meta, dict) else None
        if tagged is not None:
            if tagged == uid:
                out.append(la)
            continue
        centre = _extent_centre(la)
        lo_hi = np.asarray(s.layer.extent.world, dtype=float)[:, -2:]
        if centre is not None and np.all(centre >= lo_hi[0]) and np.all(centre <= lo_hi[1]):
            out.append(la)
    return out


def slide_annotations(session: Any, uid: int) -> list[Any]:
    """The annotations (level-0 px) of a slide's annotation layers."""
    from .annotation_layers import annotations_from_layer, relative_to_slide

    s = session.slides[uid]
    anns: list[Any] = []
    for la in annotation_layers(session, uid):
        anns += annotations_from_layer(relative_to_slide(la, s.offset), s.mpp, session.palette)
    return anns


# ------------------------------------------------------------------------------ files
def _rel(path: str | os.PathLike, folder: Path) -> str:
    """``path`` relative to the project folder when inside it (the folder can move)."""
    p = Path(path)
    try:
        return p.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(p)


def _abs(path: str, folder: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else folder / p


def load_project(folder: str | os.PathLike) -> dict:
    """The project's state (``project.json``); ``ProjectError`` when absent or unreadable."""
    path = Path(folder).expanduser() / PROJECT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProjectError(f"{path.parent}: not a napari-gpfm project (no {PROJECT_FILE})") \
            from None  # fmt: skip
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"{path}: cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ProjectError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProjectError(f"{path}: not a napari-gpfm project file (format "
                           f"{data.get('format') if isinstance(data, dict) else None!r})")
    if not isinstance(data.get("slides", []), list):
        raise ProjectError(f"{path}: 'slides' must be a list")
    return data


def is_project(folder: str | os.PathLike) -> bool:
    return (Path(folder).expanduser() / PROJECT_FILE).is_file()


def _stems(entries: Iterable[dict]) -> dict[str, str]:
    """A file stem per slide path, unique in the project (a second slide of the same name
    gets ``-2``); stems already given are kept."""
    from ..embeddings.store import safe_name

    taken: dict[str, str] = {}
    out: dict[str, str] = {}
    for e in entries:
        if e.get("stem"):
            out[e["path"]] = e["stem"]
            taken[e["stem"]] = e["path"]
    for e in entries:
        if e["path"] in out:
            continue
        base = safe_name(e.get("name") or Path(e["path"]).stem)
        stem, k = base, 2
        while stem in taken:
            stem, k = f"{base}-{k}", k + 1
        taken[stem] = e["path"]
        out[e["path"]] = stem
    return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def save_project(session: Any, slides: Iterable[str | os.PathLike] = (),
                 settings: dict | None = None) -> Path:  # fmt: skip
    """Write the session's state into its project folder (``session.out_dir``): every open
    slide (path, pixel-size override, position, store, clusters, annotations, predictions),
    ``slides`` listed but not open, the classes, the current classifiers and ``settings`` (the
    dock's embedding settings). Entries of slides not open now are kept. Returns
    ``project.json``."""
    from ..annotations.classes import palette_path
    from ..annotations.geojson import write_geojson
    from ..embeddings.store import safe_name
    from ..jobs.classifiers import KINDS

    folder = Path(session.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        old = load_project(folder)
    except ProjectError:
        old = {}
    entries: dict[str, dict] = {}
    for e in old.get("slides", []):
        if isinstance(e, dict) and e.get("path"):
            e = dict(e, open=False)
            entries[same_path(e["path"])] = e
    for p in slides:
        entries.setdefault(same_path(p), {"path": same_path(p), "name": Path(p).stem,
                                          "open": False})  # fmt: skip
    open_states = []
    for s in session.slides.values():
        key = same_path(s.slide.path)
        e = entries.get(key, {})
        e = {"path": key, "stem": e.get("stem"), "name": s.name, "open": True}
        entries[key] = e
        open_states.append((s, e))
    stems = _stems(entries.values())
    for key, e in entries.items():
        e["stem"] = stems[key]

    for s, e in open_states:
        stem = e["stem"]
        slide = s.slide
        e["mpp"] = slide.mpp if slide.mpp_source == "user" else None
        e["translate"] = [float(v) for v in s.offset]
        e["store"] = _rel(s.store.path, folder) if s.store is not None else None
        e["model"] = s.model
        e["clusters"] = None
        if s.clusters is not None and s.store is not None:
            path = folder / CLUSTERS / f"{stem}.npz"
            path.parent.mkdir(exist_ok=True)
            c = s.clusters
            tmp = path.with_name(path.name + ".part")
            with open(tmp, "wb") as fh:
                np.savez(fh, labels=c.labels, centres=c.centres, distances=c.distances,
                         method=np.asarray(c.method), normalise=np.asarray(c.normalise or ""),
                         store=np.asarray(str(s.store.path)))  # fmt: skip
            os.replace(tmp, path)
            e["clusters"] = _rel(path, folder)
        anns = slide_annotations(session, s.uid)
        path = folder / ANNOTATIONS / f"{stem}.geojson"
        if anns:
            path.parent.mkdir(exist_ok=True)
            write_geojson(path, anns)
            e["annotations"] = _rel(path, folder)
        else:
            if path.exists():
                path.unlink()  # the user deleted every annotation
            e["annotations"] = None
        e["predictions"] = sorted(s.predictions)
        e["paint"] = _save_paint(session, s, folder, stem)
        e["heatmaps"] = _save_heatmaps(session, s, folder, stem)

    if len(session.palette):
        session.palette.save(palette_path(folder))
    classifiers = {}
    for source, clf in session.classifiers.items():
        suffix = KINDS.get(getattr(clf, "kind", None))
        if suffix is None or not callable(getattr(clf, "save", None)):
            continue  # not a classifier kind napari-gpfm can read back
        path = folder / CLASSIFIERS / f"{safe_name(source)}{suffix}"
        path.parent.mkdir(exist_ok=True)
        clf.save(path)
        classifiers[source] = _rel(path, folder)
    data = {
        "format": FORMAT,
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "similarity": _similarity_entry(session),
        "slides": list(entries.values()),
        "classes": "classes.json" if len(session.palette) else old.get("classes"),
        "classifiers": classifiers or old.get("classifiers", {}),
        "settings": settings if settings is not None else old.get("settings", {}),
    }
    path = folder / PROJECT_FILE
    _write_json(path, data)
    return path


def _similarity_entry(session: Any) -> dict | None:
    """The last similarity query, slides by path: ``{"query_slide", "query", "hits"}``."""
    result = getattr(session, "last_similarity", None)
    if result is None or result.query_slide not in session.slides:
        return None
    path = {uid: same_path(s.slide.path) for uid, s in session.slides.items()}
    return {"query_slide": path[result.query_slide],
            "query": [int(i) for i in result.query],
            "hits": [[path[u], int(i), float(sc)] for u, i, sc in result.hits if u in path]}


def _similarity_result(session: Any, entry: Any, reads: Sequence[Any]) -> Any:
    """The saved query as a ``SimilarityResult`` over the reopened slides whose similarity
    values came back (``None`` when the query's slide did not)."""
    from .session import SimilarityResult

    if not isinstance(entry, dict):
        return None
    uid_of = {same_path(r.entry["path"]): r.uid for r in reads
              if r.uid in session.slides and "similarity" in session.slides[r.uid].values}
    query_uid = uid_of.get(same_path(str(entry.get("query_slide", ""))))
    if query_uid is None:
        return None
    hits = [(uid_of[same_path(p)], int(i), float(sc)) for p, i, sc in entry.get("hits") or []
            if same_path(p) in uid_of]
    scores = {uid: np.asarray(session.slides[uid].values["similarity"]) for uid in uid_of.values()}
    names = {uid: session.slides[uid].name for uid in uid_of.values()}
    return SimilarityResult(query_uid, np.asarray(entry.get("query") or [], dtype=np.int64),
                            scores, hits, names)


def _slide_layers(session: Any, uid: int, kind: str) -> list[Any]:
    """Result layers of a slide (tagged with its uid) of one ``kind``."""
    out = []
    for la in session.viewer.layers:
        meta = la.metadata.get(META) if isinstance(la.metadata, dict) else None
        if isinstance(meta, dict) and meta.get("slide_uid") == uid and meta.get("kind") == kind:
            out.append(la)
    return out


def _savez(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)


def _save_paint(session: Any, s: Any, folder: Path, stem: str) -> list[dict]:
    """Each class-paint Labels layer of the slide: ``paint/<stem>[-k].npz`` (the painted
    cells, and a header naming its classes, cell size and layer name)."""
    out = []
    m = 1.0 if s.mpp is None else float(s.mpp)
    for k, la in enumerate(_slide_layers(session, s.uid, "class-paint")):
        path = folder / PAINT / (f"{stem}.npz" if k == 0 else f"{stem}-{k + 1}.npz")
        meta = la.metadata[META]
        head = {"name": la.name, "classes": list(meta.get("classes") or session.palette.names),
                "cell": int(round(float(la.scale[-1]) / m)), "visible": bool(la.visible)}
        _savez(path, data=np.asarray(la.data, dtype=np.uint8),
               header=np.asarray(json.dumps(head)))  # fmt: skip
        out.append({"file": _rel(path, folder), "name": la.name})
    return out


def _save_heatmaps(session: Any, s: Any, folder: Path, stem: str) -> dict | None:
    """The slide's per-patch values (similarity, distance to centre, ...) in
    ``heatmaps/<stem>.npz`` and each heatmap layer's look (colormap, range, opacity,
    visibility)."""
    path = folder / HEATMAPS / f"{stem}.npz"
    values = {k: np.asarray(v) for k, v in s.values.items() if k != "cluster"}
    if not values or s.store is None:
        if path.exists():
            path.unlink()
        return None
    _savez(path, **values)
    maps = []
    for la in _slide_layers(session, s.uid, "heatmap"):
        value = la.metadata[META].get("value")
        if value not in values:
            continue
        maps.append({"value": value, "colormap": la.colormap.name,
                     "contrast_limits": [float(v) for v in la.contrast_limits],
                     "opacity": float(la.opacity), "visible": bool(la.visible)})  # fmt: skip
    return {"file": _rel(path, folder), "maps": maps}


@dataclass
class RestoreReport:
    """What :func:`restore_project` brought back, and what it could not (in words)."""

    folder: Path
    slides: list[str] = field(default_factory=list)  # every slide of the project (paths)
    opened: list[str] = field(default_factory=list)  # names
    stores: int = 0
    clusters: int = 0
    annotations: int = 0
    paint: int = 0
    heatmaps: int = 0
    hits: int = 0
    classifiers: list[str] = field(default_factory=list)
    predictions: int = 0
    settings: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.opened)} slide(s) open", f"{self.stores} feature file(s)",
                 f"{self.clusters} cluster map(s)", f"{self.annotations} annotation layer(s)"]
        if self.paint:
            parts.append(f"{self.paint} class-paint layer(s)")
        if self.heatmaps:
            parts.append(f"{self.heatmaps} heatmap(s)")
        if self.hits:
            parts.append(f"top hits on {self.hits} slide(s)")
        if self.classifiers:
            parts.append("classifier " + ", ".join(self.classifiers))
        if self.predictions:
            parts.append(f"{self.predictions} prediction(s)")
        text = f"Project {self.folder}: " + ", ".join(parts) + "."
        if self.problems:
            text += " Not restored: " + "; ".join(self.problems)
        return text


def _open_layer(session: Any, path: str) -> Any:
    """The open slide layer of ``path``, else the slide opened with napari-gpfm's reader."""
    for s in session.slides.values():
        if same_path(s.slide.path) == path:
            return s.layer
    layers = session.viewer.open(path, plugin=PLUGIN)
    return layers[0] if layers else None


class RestoreStep:
    """Main-thread work of a restore (at most one layer added): the job yields it in a record's
    ``data`` and waits until it has run. ``run()`` (main thread) keeps the value or the error
    in words; a failing step is named in the report and the restore goes on."""

    def __init__(self, what: str, fn: Any):
        import threading

        self.what, self.fn = what, fn
        self.value: Any = None
        self.error: str | None = None
        self.done = threading.Event()

    def run(self) -> Any:
        if self.done.is_set():
            return self.value
        try:
            self.value = self.fn()
        except Exception as exc:  # noqa: BLE001 - named in the report, the restore goes on
            self.error = str(exc) or type(exc).__name__
        finally:
            self.done.set()
        return self.value


#: how long the job waits for the main thread to run a step before giving up on it
STEP_WAIT_S = 120.0


@dataclass
class _Read:
    """What the worker read for one reopened slide (plain data, no layer)."""

    uid: int
    name: str
    entry: dict
    store: Any = None
    clusters: Any = None
    annotations: list | None = None
    paint: list = field(default_factory=list)  # (data, header dict)
    values: dict = field(default_factory=dict)  # per-patch heatmap values
    maps: list = field(default_factory=list)  # heatmap layers: value, colormap, limits, ...


def restore_job(session: Any, folder: str | os.PathLike
                ) -> Generator[Progress, None, RestoreReport]:  # fmt: skip
    """Restore the project in ``folder`` into the session's viewer (see :func:`restore_project`)
    as a job: files are read and classifiers loaded and applied here (a worker thread); what
    touches the viewer or the session comes as :class:`RestoreStep` records (``data``), one
    layer at most each, which the caller runs on the main thread (one per turn of the event
    loop) while the job waits. Closing the job between steps stops the restore there."""
    folder = Path(folder).expanduser()
    data = load_project(folder)
    report = RestoreReport(folder, settings=dict(data.get("settings") or {}))
    entries = [e for e in data.get("slides", []) if isinstance(e, dict) and e.get("path")]
    report.slides = [same_path(e["path"]) for e in entries]
    wanted = [e for e in entries if e.get("open")]
    total = (2 + 3 * len(wanted) + len(data.get("classifiers") or {})
             + (1 + len(wanted) if data.get("similarity") else 0))
    done = [0]

    def step(what: str, fn: Any) -> Generator[Progress, None, Any]:
        st = RestoreStep(what, fn)
        yield Progress("project", "restoring", done[0], total, unit="steps", message=what,
                       data=st)  # fmt: skip
        if not st.done.wait(STEP_WAIT_S):
            raise TimeoutError(f"restoring {folder}: '{what}' was not run on the main thread")
        done[0] += 1
        if st.error is not None:
            report.problems.append(f"{what}: {st.error}")
        return st.value

    def note(what: str) -> Progress:
        return Progress("project", "reading", done[0], total, unit="steps", message=what)

    yield Progress("project", "restoring", 0, total, status="started", unit="steps",
                   message=f"opening the project {folder}…")  # fmt: skip
    palette = None
    if data.get("classes"):
        from ..annotations.classes import ClassPalette

        try:
            palette = ClassPalette.load(_abs(data["classes"], folder))
        except (OSError, ValueError) as exc:
            report.problems.append(f"classes: {exc}")

    def start() -> None:
        session.set_out_dir(folder)
        if palette is not None:
            session.palette.update_from(palette)

    yield from step("output folder and classes", start)

    # --- slides (main thread: napari opens them), then their files (here) ---
    reads: list[_Read] = []
    for e in wanted:
        path = same_path(e["path"])
        name = e.get("name") or Path(path).stem
        if not Path(path).exists():
            report.problems.append(f"{name}: the slide file {path} is gone")
            continue
        uid = yield from step(f"{name}: opening the slide", lambda p=path, e=e: _reopen(
            session, p, e))
        if uid is None:
            continue
        state = session.slides[uid]
        report.opened.append(state.name)
        reads.append(_Read(uid, state.name, e))
    for r in reads:
        yield note(f"{r.name}: reading its files…")
        _read_slide(session, folder, r, report)

    # --- per slide: store and clusters, then one layer per step ---
    for r in reads:
        if r.store is None:
            continue
        yield from step(f"{r.name}: feature file", lambda r=r: _attach(session, r, report))
        if r.clusters is not None:
            yield from step(f"{r.name}: cluster map", lambda r=r: _show_clusters(session, r,
                                                                                 report))
        if r.annotations is not None:
            yield from step(f"{r.name}: annotations", lambda r=r: _add_annotations(
                session, r, report))
        for i, (arr, head) in enumerate(r.paint):
            yield from step(f"{r.name}: {head.get('name') or 'class paint'}",
                            lambda r=r, a=arr, h=head: _add_paint(session, r, a, h, report))
        for m in r.maps:
            yield from step(f"{r.name}: heatmap {m['value']}", lambda r=r, m=m: _show_map(
                session, r, m, report))

    # --- the last similarity query: its top hits outlined again (heatmaps came back above) ---
    sim = data.get("similarity")
    if sim:
        result = yield from step("similarity query", lambda: _restore_similarity(
            session, sim, reads))
        for uid in sorted(set(result.scores) if result is not None else ()):
            name = session.slides[uid].name if uid in session.slides else str(uid)
            yield from step(f"{name}: top hits", lambda u=uid, res=result: _show_hits(
                session, res, u, report))

    # --- classifiers (loaded here: PathoTune builds its backbone) and their predictions ---
    loaded: dict[str, Any] = {}
    for source, rel in (data.get("classifiers") or {}).items():
        yield note(f"loading the classifier {source}…")
        try:
            from ..jobs.classifiers import load_classifier

            loaded[source] = load_classifier(_abs(rel, folder))
        except Exception as exc:  # noqa: BLE001 - a damaged file is named
            report.problems.append(f"classifier {source}: {exc}")
            continue
        yield from step(f"classifier {source}", lambda s_=source, c=loaded[source]: (
            session.set_classifier(s_, c), report.classifiers.append(s_)))
    for r in reads:
        for source in r.entry.get("predictions") or []:
            clf = loaded.get(source)
            if clf is None or r.store is None:
                continue
            yield note(f"{r.name}: predicting with {source}…")
            try:
                pred = clf.predict_store(r.store)
                rasters = pred.rasters()
            except Exception as exc:  # noqa: BLE001
                report.problems.append(f"{r.name}: prediction not restored ({exc})")
                continue
            if r.uid not in session.slides:
                continue
            steps = yield from step(f"{r.name}: {source} maps", lambda r=r, s_=source, p=pred,
                                    ra=rasters: session.prediction_steps(
                                        r.uid, s_, ra, p.class_names, p.colours))  # fmt: skip
            for k, fn in enumerate(steps or []):
                yield from step(f"{r.name}: {source} map {k + 1}/{len(steps)}", fn)
            report.predictions += 1
    yield Progress("project", "restoring", total, total, status="done", unit="steps",
                   message=report.summary())  # fmt: skip
    return report


def _restore_similarity(session: Any, entry: Any, reads: Sequence[Any]) -> Any:
    """Main thread: the saved query becomes the session's last similarity result again."""
    result = _similarity_result(session, entry, reads)
    if result is None:
        raise ValueError("its slide or its similarity values did not come back")
    session.last_similarity = result
    return result


def _show_hits(session: Any, result: Any, uid: int, report: RestoreReport) -> None:
    if session.show_top_hits(result, uid) is not None:
        report.hits += 1


def _reopen(session: Any, path: str, e: dict) -> int | None:
    """Main thread: the slide open (napari-gpfm's reader), with its saved mpp and position."""
    from .reader import set_layer_mpp

    layer = _open_layer(session, path)
    if layer is None or int(layer.unique_id) not in session.slides:
        raise ValueError(f"napari-gpfm's reader did not open {path}")
    if e.get("mpp"):
        set_layer_mpp(layer, float(e["mpp"]))
    if e.get("translate") and any(e["translate"]):
        t = np.asarray(layer.translate, dtype=float)
        t[-2:] = e["translate"]
        layer.translate = t
    return int(layer.unique_id)


def _read_slide(session: Any, folder: Path, r: _Read, report: RestoreReport) -> None:
    """Worker: the slide's store, clusters, annotations, paint layers and heatmap values."""
    from ..analyses.clusters import ClusterResult
    from ..annotations.geojson import read_geojson
    from ..embeddings import open_store

    e = r.entry
    state = session.slides.get(r.uid)
    if state is None:
        return
    slide = state.slide
    if e.get("store"):
        try:
            r.store = open_store(_abs(e["store"], folder), expected_slide=slide)
        except Exception as exc:  # noqa: BLE001 - named, the rest goes on
            report.problems.append(f"{r.name}: feature file not used ({exc})")
    if r.store is None and e.get("model"):
        found = slide_stores(session.out_dir, slide, e["model"])
        if found:
            r.store = open_store(found[0].path, expected_slide=slide)
    if r.store is None:
        return
    n = int(r.store.n_patches)
    if e.get("clusters"):
        try:
            with np.load(_abs(e["clusters"], folder), allow_pickle=False) as z:
                labels = np.asarray(z["labels"])
                r.clusters = ClusterResult(labels, np.asarray(z["centres"]),
                                           np.asarray(z["distances"]), str(z["method"]),
                                           str(z["normalise"]) or None)  # fmt: skip
            if len(labels) != n:
                raise ValueError(f"{len(labels)} labels for {n} patches")
        except (OSError, ValueError, KeyError) as exc:
            r.clusters = None
            report.problems.append(f"{r.name}: clusters not restored ({exc})")
    if e.get("annotations"):
        try:
            r.annotations = list(read_geojson(_abs(e["annotations"], folder)))
        except (OSError, ValueError) as exc:
            report.problems.append(f"{r.name}: annotations not restored ({exc})")
    for item in e.get("paint") or []:
        try:
            with np.load(_abs(item["file"], folder), allow_pickle=False) as z:
                head = json.loads(str(z["header"]))
                r.paint.append((np.asarray(z["data"]), head))
        except (OSError, ValueError, KeyError) as exc:
            report.problems.append(f"{r.name}: class paint not restored ({exc})")
    heat = e.get("heatmaps") or {}
    if heat.get("file"):
        try:
            with np.load(_abs(heat["file"], folder), allow_pickle=False) as z:
                values = {k: np.asarray(z[k]) for k in z.files}
            bad = [k for k, v in values.items() if len(v) != n]
            if bad:
                raise ValueError(f"{', '.join(bad)}: not one value per patch ({n})")
            r.values = values
            r.maps = [m for m in heat.get("maps") or [] if m.get("value") in values]
        except (OSError, ValueError, KeyError) as exc:
            report.problems.append(f"{r.name}: heatmaps not restored ({exc})")


def _attach(session: Any, r: _Read, report: RestoreReport) -> None:
    session.attach_store(r.uid, r.store)
    report.stores += 1
    s = session.slides[r.uid]
    if r.clusters is not None:
        session.set_clusters(r.uid, r.clusters)
    s.values.update(r.values)


def _show_clusters(session: Any, r: _Read, report: RestoreReport) -> None:
    session.show_clusters(r.uid)
    report.clusters += 1


def _add_annotations(session: Any, r: _Read, report: RestoreReport) -> None:
    from .annotation_layers import annotation_layer_data
    from .session import result_name

    s = session.slides[r.uid]
    name = result_name(s.name, "annotations")
    viewer = session.viewer
    if name in viewer.layers:
        return  # already there (the project was reopened in the same window)
    for a in r.annotations:
        if a.class_name:
            session.palette.ensure(a.class_name, a.color)
    ld, kwargs, _ = annotation_layer_data(list(r.annotations), session.palette, s.mpp, name,
                                          s.name)  # fmt: skip
    t = np.asarray(kwargs.get("translate", (0.0, 0.0)), dtype=float) + np.asarray(s.offset)
    kwargs["translate"] = tuple(float(v) for v in t)
    kwargs["metadata"][META].update(slide_uid=s.uid, slide_layer=s.name)
    viewer.add_shapes(ld, **kwargs)
    report.annotations += 1


def _add_paint(session: Any, r: _Read, data: np.ndarray, head: dict,
               report: RestoreReport) -> None:  # fmt: skip
    """A class-paint Labels layer as the Annotate dock makes it, holding the saved paint; the
    painted values follow the classes by name (the palette may list them in another order)."""
    from .annotation_layers import paint_layer_data
    from .session import result_name

    s = session.slides[r.uid]
    name = head.get("name") or result_name(s.name, "class paint")
    viewer = session.viewer
    if name in viewer.layers:
        return
    saved = list(head.get("classes") or [])
    for c in saved:
        session.palette.ensure(c)
    names = session.palette.names
    lookup = np.zeros(max(len(saved), int(data.max(initial=0))) + 1, dtype=np.uint8)
    for i, c in enumerate(saved):
        lookup[i + 1] = names.index(c) + 1
    ld, kwargs, _ = paint_layer_data(s.slide.dimensions, s.mpp, session.palette,
                                     int(head["cell"]), name)  # fmt: skip
    if ld.shape != data.shape:
        raise ValueError(f"saved paint is {data.shape[1]}×{data.shape[0]} cells, this slide "
                         f"needs {ld.shape[1]}×{ld.shape[0]}")
    t = np.asarray(kwargs["translate"], dtype=float) + np.asarray(s.offset)
    kwargs["translate"] = tuple(float(v) for v in t)
    kwargs["metadata"][META].update(slide_uid=s.uid, slide_layer=s.name)
    kwargs["visible"] = bool(head.get("visible", True))
    viewer.add_labels(lookup[data], **kwargs)
    report.paint += 1


def _show_map(session: Any, r: _Read, m: dict, report: RestoreReport) -> None:
    lo_hi = m.get("contrast_limits")
    layer = session.show_heatmap(
        r.uid, m["value"], colormap=m.get("colormap") or "viridis",
        opacity=float(m.get("opacity", 0.6)),
        contrast_limits=tuple(float(v) for v in lo_hi) if lo_hi else None)  # fmt: skip
    if m.get("visible") is False:
        layer.visible = False
    report.heatmaps += 1


def restore_project(session: Any, folder: str | os.PathLike) -> RestoreReport:
    """Open the project in ``folder`` in the session's viewer (main thread, at once; a dock runs
    :func:`restore_job` instead): the project folder becomes the output folder; the classes,
    the slides that were open (reopened with napari-gpfm's reader, pixel-size override and
    position as saved), their stores, clusters (painted), annotation and class-paint layers,
    heatmaps (colormap and range as saved), the classifiers (linear probe or PathoTune) and
    their predictions come back. A slide or file that cannot be restored is named in the report
    and the rest goes on."""
    job = restore_job(session, folder)
    try:
        while True:
            try:
                p = next(job)
            except StopIteration as stop:
                return stop.value
            if isinstance(p.data, RestoreStep):
                p.data.run()
    finally:
        job.close()


def predicted_file(folder: str | os.PathLike, name: str) -> Path:
    """Where "Apply classifier to all" writes a slide's class polygons."""
    from ..embeddings.store import safe_name

    return Path(folder) / PREDICTIONS / f"{safe_name(name)}.geojson"


def annotation_summary(path: str | os.PathLike) -> tuple[int, list[str]]:
    """(annotations, classes) of a saved GeoJSON; (0, []) when unreadable."""
    from ..annotations.geojson import read_geojson

    try:
        anns = read_geojson(path)
    except (OSError, ValueError):
        return 0, []
    return len(anns), sorted({a.class_name for a in anns if a.class_name})
