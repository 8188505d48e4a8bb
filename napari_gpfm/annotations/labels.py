"""Patch labels from annotation shapes.

A patch at level-0 top-left ``(x, y)`` with side ``P`` covers the square ``[x, x+P) × [y, y+P)``
in QuPath's pixel-edge coordinates. For every class the fraction of that square lying inside the
class's polygons (holes subtracted) is computed **exactly** (polygon ∩ square area by integrating
each edge of the polygon clipped to the square, vectorised over patches), not sampled.

A patch gets a class when its fraction is at least ``min_fraction``. When two or more classes
reach it (``min_fraction ≤ 0.5``, or overlapping shapes of different classes) the patch is
reported in ``conflicts`` and, by default, left unlabelled. Shapes of ``Ignore*`` classes never
become labels; a patch whose ``Ignore*`` fraction reaches ``min_fraction`` is unlabelled and
flagged in ``ignored``. Shapes of one class are assumed not to overlap each other; where they
do, their fractions are added (capped at 1), which can over-count the overlap.

Nothing is dropped silently: :attr:`PatchLabels.coverage` says per class how many annotations
it had, how many embedded patches they touch and how many they labelled, and a class whose
annotations label no patch gets a message naming the class and the reason (most often: its
regions lie outside the detected tissue, where no patch was embedded) in
:attr:`PatchLabels.empty_classes` and ``skipped``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .geojson import Annotation

__all__ = [
    "ClassCoverage",
    "PatchLabels",
    "labels_from_annotations",
    "square_coverage",
    "unlabelled_reasons",
]

_PAIR_BUDGET = 1_000_000  # edge × patch pairs evaluated per numpy batch
#: what to do about annotated regions where no patch was embedded
OUTSIDE_TISSUE_HINT = (
    "they lie outside the detected tissue; embed with the whole image (tissue 'none') to "
    "include them"
)


@dataclass(frozen=True)
class ClassCoverage:
    """What one class's annotations gave: ``annotations`` (shapes with an area), ``touched``
    (embedded patches they overlap at all) and ``labelled`` (patches labelled with the class;
    for an ``Ignore*`` class, patches it left out)."""

    annotations: int
    touched: int
    labelled: int


@dataclass(frozen=True, eq=False)
class PatchLabels:
    """Result of :func:`labels_from_annotations`.

    labels : (N,) int64 index into ``class_names``, -1 = unlabelled.
    fractions : (N, C) float64 fraction of each patch inside each class's shapes.
    class_names : training classes (no ``Ignore*``), column order of ``fractions``.
    conflicts : (M,) int64 patch indices where two or more classes reach ``min_fraction``.
    conflict_classes : for each conflict, the names of the classes that reached it.
    ignored : (N,) bool, patches mostly inside ``Ignore*`` shapes.
    excluded_classes : ``Ignore*`` class names met in the annotations.
    skipped : human-readable notes (unclassified shapes, classes not in ``class_names``, and
        the messages of ``empty_classes``).
    coverage : per class met in the annotations, its :class:`ClassCoverage`.
    empty_classes : class name → why its annotations labelled no patch (e.g. "class
        'Background': 2 annotations cover no embedded patch — they lie outside the detected
        tissue; ...").
    """

    labels: np.ndarray
    fractions: np.ndarray
    class_names: list[str]
    conflicts: np.ndarray
    conflict_classes: list[list[str]]
    ignored: np.ndarray
    excluded_classes: list[str]
    skipped: list[str]
    coverage: dict[str, ClassCoverage] = field(default_factory=dict)
    empty_classes: dict[str, str] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Labelled patches per class."""
        return {n: int(np.sum(self.labels == i)) for i, n in enumerate(self.class_names)}


def _clamp_antiderivative(t: np.ndarray, P: float) -> np.ndarray:
    """G(t) = ∫_0^t clamp(τ, 0, P) dτ, extended with G' = clamp for t < 0."""
    return np.where(t <= 0, 0.0, np.where(t >= P, P * P / 2 + P * (t - P), t * t / 2))


def _ring_square_integrals(
    ring: np.ndarray, xs: np.ndarray, ys: np.ndarray, P: float
) -> np.ndarray:
    """Signed area of ``ring`` ∩ each square ``[xs, xs+P) × [ys, ys+P)`` (sign = orientation).

    For a closed ring, Σ_edges ∫ clamp(y(x) − y_s, 0, P) dx over x clipped to the square equals
    ± the area of the ring's interior inside the square (vertical chords through the square,
    each crossing counted with the edge direction). Each edge is linear, so the integral is
    (xe − xs)·(G(b) − G(a))/(b − a) with G the antiderivative of the clamp.
    """
    x1, y1 = ring[:-1, 0], ring[:-1, 1]
    x2, y2 = ring[1:, 0], ring[1:, 1]
    moving = x1 != x2  # vertical edges contribute nothing
    x1, y1, x2, y2 = x1[moving], y1[moving], x2[moving], y2[moving]
    out = np.zeros(xs.shape[0])
    if x1.size == 0:
        return out
    slope = (y2 - y1) / (x2 - x1)
    step = max(1, _PAIR_BUDGET // x1.size)
    for s in range(0, xs.shape[0], step):
        px = xs[s : s + step, None]
        py = ys[s : s + step, None]
        u1 = np.clip(x1 - px, 0.0, P)  # edge x-range clipped to the square, local coords
        u2 = np.clip(x2 - px, 0.0, P)
        a = y1 + slope * (u1 + px - x1) - py  # local y at the clipped ends
        b = y1 + slope * (u2 + px - x1) - py
        dx = u2 - u1
        flat = np.abs(b - a) < 1e-9
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(
                flat,
                np.clip((a + b) / 2, 0.0, P),
                (_clamp_antiderivative(b, P) - _clamp_antiderivative(a, P)) / (b - a),
            )
        out[s : s + step] = np.sum(np.where(dx != 0, mean * dx, 0.0), axis=1)
    return out


def square_coverage(
    polygons: Sequence[Sequence[np.ndarray]], coords: np.ndarray, patch_size_level0: int
) -> np.ndarray:
    """(N,) fraction of each patch square inside ``polygons`` ([exterior, holes...] rings).

    Only patches overlapping the polygons' bounding box are evaluated.
    """
    c = np.asarray(coords, dtype=np.float64)
    P = float(patch_size_level0)
    area = np.zeros(c.shape[0])
    for poly in polygons:
        ext = np.asarray(poly[0], dtype=np.float64)
        lo, hi = ext.min(axis=0), ext.max(axis=0)
        near = np.nonzero(
            (c[:, 0] < hi[0]) & (c[:, 0] + P > lo[0]) & (c[:, 1] < hi[1]) & (c[:, 1] + P > lo[1])
        )[0]
        if near.size == 0:
            continue
        xs, ys = c[near, 0], c[near, 1]
        a = np.abs(_ring_square_integrals(ext, xs, ys, P))
        for hole in poly[1:]:
            a -= np.abs(_ring_square_integrals(np.asarray(hole, np.float64), xs, ys, P))
        area[near] += a
    return np.clip(area / (P * P), 0.0, 1.0)


def labels_from_annotations(
    annotations: Iterable[Annotation],
    coords: np.ndarray,
    patch_size_level0: int,
    class_names: Sequence[str] | None = None,
    min_fraction: float = 0.5,
    on_conflict: Literal["skip", "largest"] = "skip",
) -> PatchLabels:
    """Assign each patch the class whose shapes cover at least ``min_fraction`` of it.

    ``class_names`` fixes the classes and their order (shapes of other classes are skipped and
    noted); by default every non-``Ignore*`` class met, in order of first appearance.
    ``on_conflict="largest"`` gives conflicting patches the class with the largest fraction
    (ties: first class) instead of leaving them unlabelled; they are reported either way.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    c = np.asarray(coords)
    n = c.shape[0]
    anns = [a for a in annotations if a.polygons]
    skipped: list[str] = []
    unclassified = sum(1 for a in anns if a.class_name is None)
    if unclassified:
        skipped.append(f"{unclassified} shape(s) without a class were skipped")
    excluded = sorted({a.class_name for a in anns if a.excluded})
    met = [a.class_name for a in anns if a.class_name is not None and not a.excluded]
    names = list(dict.fromkeys(met)) if class_names is None else list(class_names)
    unknown = sorted(set(met) - set(names))
    if unknown:
        skipped.append(f"shapes of classes {unknown} were skipped (not among {names})")
    col = {name: i for i, name in enumerate(names)}
    fractions = np.zeros((n, len(names)))
    ignore_frac = np.zeros(n)
    n_annotations: dict[str, int] = {}
    touched: dict[str, np.ndarray] = {}  # class -> patches its shapes overlap at all
    ignore_by_class: dict[str, np.ndarray] = {}
    for a in anns:
        if a.class_name is None:
            continue
        name = a.class_name
        n_annotations[name] = n_annotations.get(name, 0) + 1
        if not (a.excluded or name in col):
            continue
        cover = square_coverage(a.polygons, c, patch_size_level0)
        hit = touched.setdefault(name, np.zeros(n, dtype=bool))
        hit |= cover > 1e-12
        if a.excluded:
            ignore_frac += cover
            ignore_by_class[name] = ignore_by_class.get(name, 0.0) + cover
        else:
            fractions[:, col[name]] += cover
    np.clip(fractions, 0.0, 1.0, out=fractions)
    out = labels_from_fractions(fractions, names, ignore_frac, min_fraction, on_conflict,
                                excluded, skipped)
    coverage: dict[str, ClassCoverage] = {}
    empty: dict[str, str] = {}
    for name, count in n_annotations.items():
        if name not in touched:  # a class not among class_names: noted above
            continue
        if name in ignore_by_class:
            labelled = int(np.sum(ignore_by_class[name] >= min_fraction - 1e-9))
        else:
            labelled = int(np.sum(out.labels == col[name]))
        coverage[name] = ClassCoverage(count, int(touched[name].sum()), labelled)
        if labelled == 0 and name in col and name not in ignore_by_class:
            empty[name] = _why_empty(name, coverage[name], fractions[:, col[name]],
                                     touched[name], min_fraction)
    return dataclasses.replace(out, coverage=coverage, empty_classes=empty,
                               skipped=out.skipped + list(empty.values()))


def _annotations(k: int) -> str:
    return f"{k} annotation{'' if k == 1 else 's'}"


def _why_empty(
    name: str, cov: ClassCoverage, fraction: np.ndarray, touched: np.ndarray, min_fraction: float
) -> str:
    """Why the annotations of class ``name`` labelled no patch, naming the class."""
    one = cov.annotations == 1
    if cov.touched == 0:
        hint = OUTSIDE_TISSUE_HINT
        if one:
            hint = hint.replace("they lie", "it lies").replace("include them", "include it")
        return (
            f"class {name!r}: {_annotations(cov.annotations)} {'covers' if one else 'cover'} "
            f"no embedded patch — {hint}"
        )
    best = float(fraction[touched].max())
    if best < min_fraction - 1e-9:
        patches = f"{cov.touched} embedded patch{'' if cov.touched == 1 else 'es'}"
        return (
            f"class {name!r}: {_annotations(cov.annotations)} {'touches' if one else 'touch'} "
            f"{patches} but {'covers' if one else 'cover'} none of them by at least "
            f"{min_fraction:.0%} (at most {best:.0%}) — draw larger regions or lower the "
            "minimum coverage"
        )
    return (
        f"class {name!r}: every patch its {_annotations(cov.annotations)} cover by at least "
        f"{min_fraction:.0%} is also claimed by another class (a conflict) or by an Ignore* "
        "region — separate the regions"
    )


def unlabelled_reasons(
    labels: PatchLabels, class_names: Iterable[str] | None = None
) -> list[str]:
    """The messages saying why classes (default: all) have annotations but no labelled patch.

    Read from ``labels.empty_classes``, or, for labels rebuilt without that field (merged
    labels), from the class messages in ``labels.skipped``.
    """
    names = None if class_names is None else list(class_names)
    found = [m for k, m in labels.empty_classes.items() if names is None or k in names]
    if found:
        return found
    if names is None:
        return [m for m in labels.skipped if m.startswith("class '")]
    return [m for m in labels.skipped if any(m.startswith(f"class {k!r}:") for k in names)]


def labels_from_fractions(
    fractions: np.ndarray,
    class_names: Sequence[str],
    ignore_frac: np.ndarray,
    min_fraction: float,
    on_conflict: str = "skip",
    excluded_classes: Sequence[str] = (),
    skipped: Sequence[str] = (),
    trainable: np.ndarray | None = None,
) -> PatchLabels:
    """The patch-labelling rule, from each patch's covered fraction per class (N, C).

    A patch takes the class that reaches ``min_fraction``; two or more reaching it is a
    conflict (left unlabelled, or the largest with ``on_conflict="largest"``); a patch whose
    ``Ignore*`` coverage reaches it is unlabelled and flagged. ``trainable`` (C,) bool masks
    out columns that must never label a patch.
    """
    names = list(class_names)
    # tolerance so that an exactly representable 0.6 coverage is not lost to rounding
    reach = fractions >= min_fraction - 1e-9
    if trainable is not None:
        reach[:, ~np.asarray(trainable, bool)] = False
    n_reach = reach.sum(axis=1)
    labels = np.full(len(fractions), -1, dtype=np.int64)
    single = n_reach == 1
    labels[single] = reach[single].argmax(axis=1)
    conflicts = np.nonzero(n_reach > 1)[0]
    if on_conflict == "largest":
        labels[conflicts] = np.where(reach[conflicts], fractions[conflicts], -1).argmax(axis=1)
    elif on_conflict != "skip":
        raise ValueError(f"on_conflict must be 'skip' or 'largest', got {on_conflict!r}")
    ignored = ignore_frac >= min_fraction - 1e-9
    labels[ignored] = -1
    return PatchLabels(
        labels=labels,
        fractions=fractions,
        class_names=names,
        conflicts=conflicts.astype(np.int64),
        conflict_classes=[[names[j] for j in np.nonzero(reach[i])[0]] for i in conflicts],
        ignored=ignored,
        excluded_classes=list(excluded_classes),
        skipped=list(skipped),
    )
