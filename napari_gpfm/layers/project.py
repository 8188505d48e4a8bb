"""A project: the slides of a study and everything napari-gpfm made for them, in one folder.

As a QuPath project, the **project folder** (the session's output folder,
:attr:`~napari_gpfm.layers.session.ViewerSession.out_dir`) holds everything::

    <project>/project.json                 the session state (this module's format)
    <project>/classes.json                 the class palette (shared with the Annotate dock)
    <project>/<tiling>/features_<model>/   the feature stores (<slide>.h5)
    <project>/annotations/<slide>.geojson  the annotations of each slide (QuPath GeoJSON)
    <project>/clusters/<slide>.npz         k-means results (labels, centres, distances)
    <project>/classifiers/<source>.npz     the current classifier(s) (linear probe files)
    <project>/predictions/<slide>.geojson  "Apply classifier to all" outputs (+ _patches.csv)

:func:`save_project` writes the session's plain data there; :func:`restore_project` opens a
project in a viewer (slides reopened with napari-gpfm's reader, stores attached, clusters,
classes, annotation layers, the current classifier and its predictions back). Slides listed
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
    "restore_project",
    "same_path",
    "save_project",
    "scan_job",
    "slide_stores",
]

PROJECT_FILE = "project.json"
FORMAT = "napari-gpfm-project/1"
ANNOTATIONS, CLUSTERS, CLASSIFIERS, PREDICTIONS = (
    "annotations", "clusters", "classifiers", "predictions")  # fmt: skip
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
    from .annotation_layers import annotations_from_layer

    s = session.slides[uid]
    anns: list[Any] = []
    for la in annotation_layers(session, uid):
        anns += annotations_from_layer(_relative(la, s.offset), s.mpp, session.palette)
    return anns


class _Shifted:
    """A layer seen with another ``translate`` (every other attribute is the layer's)."""

    def __init__(self, layer: Any, translate: np.ndarray):
        self._layer = layer
        self.translate = translate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)


def _relative(layer: Any, offset: tuple[float, float]) -> Any:
    """``layer`` placed relative to its slide (the annotation readers take world (0, 0) as the
    slide's level-0 origin)."""
    off = np.asarray(offset, dtype=float)
    if not np.any(off):
        return layer
    t = np.array(layer.translate, dtype=float)
    t[-2:] -= off
    return _Shifted(layer, t)


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
    from ..analyses.probe import LinearProbe
    from ..annotations.classes import palette_path
    from ..annotations.geojson import write_geojson

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

    if len(session.palette):
        session.palette.save(palette_path(folder))
    classifiers = {}
    for source, clf in session.classifiers.items():
        if isinstance(clf, LinearProbe):
            path = folder / CLASSIFIERS / f"{source}.npz"
            path.parent.mkdir(exist_ok=True)
            clf.save(path)
            classifiers[source] = _rel(path, folder)
    data = {
        "format": FORMAT,
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "slides": list(entries.values()),
        "classes": "classes.json" if len(session.palette) else old.get("classes"),
        "classifiers": classifiers or old.get("classifiers", {}),
        "settings": settings if settings is not None else old.get("settings", {}),
    }
    path = folder / PROJECT_FILE
    _write_json(path, data)
    return path


@dataclass
class RestoreReport:
    """What :func:`restore_project` brought back, and what it could not (in words)."""

    folder: Path
    slides: list[str] = field(default_factory=list)  # every slide of the project (paths)
    opened: list[str] = field(default_factory=list)  # names
    stores: int = 0
    clusters: int = 0
    annotations: int = 0
    classifiers: list[str] = field(default_factory=list)
    predictions: int = 0
    settings: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.opened)} slide(s) open", f"{self.stores} feature file(s)",
                 f"{self.clusters} cluster map(s)", f"{self.annotations} annotation layer(s)"]
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


def restore_project(session: Any, folder: str | os.PathLike) -> RestoreReport:
    """Open the project in ``folder`` in the session's viewer (main thread): the project folder
    becomes the output folder; the classes, the slides that were open (reopened with
    napari-gpfm's reader, pixel-size override and position as saved), their stores, clusters
    (painted), annotation layers, the classifiers and the predictions come back. A slide or
    file that cannot be restored is named in the report and the rest goes on."""
    from ..analyses.clusters import ClusterResult
    from ..analyses.probe import load_probe
    from ..annotations.classes import ClassPalette
    from ..annotations.geojson import read_geojson
    from .annotation_layers import annotation_layer_data
    from .reader import set_layer_mpp
    from .session import result_name

    folder = Path(folder).expanduser()
    data = load_project(folder)
    report = RestoreReport(folder, settings=dict(data.get("settings") or {}))
    session.set_out_dir(folder)
    if data.get("classes"):
        try:
            session.palette.update_from(ClassPalette.load(_abs(data["classes"], folder)))
        except (OSError, ValueError) as exc:
            report.problems.append(f"classes: {exc}")

    restored: list[tuple[Any, dict]] = []
    for e in data.get("slides", []):
        if not isinstance(e, dict) or not e.get("path"):
            continue
        path = same_path(e["path"])
        report.slides.append(path)
        if not e.get("open"):
            continue
        name = e.get("name") or Path(path).stem
        if not Path(path).exists():
            report.problems.append(f"{name}: the slide file {path} is gone")
            continue
        try:
            layer = _open_layer(session, path)
        except Exception as exc:  # noqa: BLE001 - named, the other slides go on
            report.problems.append(f"{name}: {exc}")
            continue
        if layer is None or int(layer.unique_id) not in session.slides:
            report.problems.append(f"{name}: napari-gpfm's reader did not open {path}")
            continue
        if e.get("mpp"):
            set_layer_mpp(layer, float(e["mpp"]))
        if e.get("translate") and any(e["translate"]):
            t = np.asarray(layer.translate, dtype=float)
            t[-2:] = e["translate"]
            layer.translate = t
        report.opened.append(layer.name)
        restored.append((session.slides[int(layer.unique_id)], e))

    for s, e in restored:
        store = None
        if e.get("store"):
            try:
                store = session.use_store_file(s.uid, _abs(e["store"], folder))
            except Exception as exc:  # noqa: BLE001
                report.problems.append(f"{s.name}: feature file not used ({exc})")
        if store is None and e.get("model"):
            store = session.find_store(s.uid, e["model"])
        if store is None:
            continue
        report.stores += 1
        if e.get("clusters"):
            try:
                with np.load(_abs(e["clusters"], folder), allow_pickle=False) as z:
                    labels = np.asarray(z["labels"])
                    res = ClusterResult(labels, np.asarray(z["centres"]),
                                        np.asarray(z["distances"]), str(z["method"]),
                                        str(z["normalise"]) or None)  # fmt: skip
                if len(labels) != s.n:
                    raise ValueError(f"{len(labels)} labels for {s.n} patches")
                session.set_clusters(s.uid, res)
                session.show_clusters(s.uid)
                report.clusters += 1
            except (OSError, ValueError, KeyError) as exc:
                report.problems.append(f"{s.name}: clusters not restored ({exc})")

    for s, e in restored:
        if not e.get("annotations"):
            continue
        name = result_name(s.name, "annotations")
        viewer = session.viewer
        if name in viewer.layers:
            continue  # already there (the project was reopened in the same window)
        try:
            anns = read_geojson(_abs(e["annotations"], folder))
        except (OSError, ValueError) as exc:
            report.problems.append(f"{s.name}: annotations not restored ({exc})")
            continue
        for a in anns:
            if a.class_name:
                session.palette.ensure(a.class_name, a.color)
        ld, kwargs, _ = annotation_layer_data(list(anns), session.palette, s.mpp, name, s.name)
        t = np.asarray(kwargs.get("translate", (0.0, 0.0)), dtype=float) + np.asarray(s.offset)
        kwargs["translate"] = tuple(float(v) for v in t)
        kwargs["metadata"][META].update(slide_uid=s.uid, slide_layer=s.name)
        viewer.add_shapes(ld, **kwargs)
        report.annotations += 1

    for source, rel in (data.get("classifiers") or {}).items():
        try:
            probe = load_probe(_abs(rel, folder))
        except Exception as exc:  # noqa: BLE001 - a damaged file is named
            report.problems.append(f"classifier {source}: {exc}")
            continue
        session.set_classifier(source, probe)
        report.classifiers.append(source)

    for s, e in restored:
        for source in e.get("predictions") or []:
            clf = session.classifiers.get(source)
            if clf is None or s.store is None:
                continue
            try:
                pred = clf.predict_store(s.store)
            except Exception as exc:  # noqa: BLE001
                report.problems.append(f"{s.name}: prediction not restored ({exc})")
                continue
            session.set_prediction(s.uid, source, pred.rasters(), pred.class_names,
                                   pred.colours)  # fmt: skip
            report.predictions += 1
    return report


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
