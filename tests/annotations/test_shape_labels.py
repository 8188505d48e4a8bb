"""Shapes drawn in QuPath become patch labels by the fraction of each patch they cover."""

import numpy as np
import pytest
from skimage.draw import polygon2mask

from napari_gpfm.annotations.geojson import Annotation
from napari_gpfm.annotations.labels import labels_from_annotations, square_coverage

P = 100
X0, Y0 = 80_000, 40_000  # level-0 offsets typical of a real slide
COORDS = np.array([[X0, Y0], [X0 + P, Y0], [X0 + 2 * P, Y0]])


def rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float) + (X0, Y0)


def shape(cls, *rings):
    return Annotation([list(rings)], "Polygon", cls, (255, 0, 0))


def test_rectangle_covering_60_percent_labels_at_half_but_not_at_70_percent():
    anns = [shape("Tumor", rect(0, 0, 60, 100))]
    res = labels_from_annotations(anns, COORDS, P, min_fraction=0.5)
    assert res.fractions[:, 0].tolist() == pytest.approx([0.6, 0.0, 0.0], abs=1e-12)
    assert res.labels.tolist() == [0, -1, -1] and res.class_names == ["Tumor"]
    assert labels_from_annotations(anns, COORDS, P, min_fraction=0.7).labels.tolist() == [
        -1,
        -1,
        -1,
    ]


def test_holes_are_subtracted_exactly():
    donut = shape("Stroma", rect(100, 0, 300, 100), rect(120, 20, 180, 80)[::-1])
    res = labels_from_annotations([donut], COORDS, P, min_fraction=0.65)
    assert res.fractions[:, 0].tolist() == pytest.approx([0.0, 0.64, 1.0], abs=1e-12)
    assert res.labels.tolist() == [-1, -1, 0]


def test_exact_coverage_matches_dense_sampling_for_a_concave_polygon():
    rng = np.random.default_rng(0)
    ang = np.sort(rng.uniform(0, 2 * np.pi, 25))
    rad = rng.uniform(30, 140, 25)
    ring = np.c_[150 + rad * np.cos(ang), 60 + rad * np.sin(ang)]
    ring = np.vstack([ring, ring[:1]])
    hole = np.array([[140, 40], [170, 40], [155, 70], [140, 40]], float)
    got = square_coverage([[ring + (X0, Y0), hole + (X0, Y0)]], COORDS, P)
    n = 500  # samples per patch side
    for i, xy in enumerate(COORDS - (X0, Y0)):
        # sample points at sub-pixel centres: mask index j <-> local coordinate (j + 0.5)·P/n
        ring_px, hole_px = ((r - xy) * n / P - 0.5 for r in (ring, hole))
        inside = polygon2mask((n, n), ring_px[:, ::-1]) & ~polygon2mask((n, n), hole_px[:, ::-1])
        assert got[i] == pytest.approx(inside.mean(), abs=0.01)


def test_conflicts_are_reported_and_left_unlabelled_by_default():
    anns = [shape("Tumor", rect(0, 0, 60, 100)), shape("Stroma", rect(40, 0, 100, 100))]
    res = labels_from_annotations(anns, COORDS, P, min_fraction=0.5)
    assert res.conflicts.tolist() == [0]
    assert res.conflict_classes == [["Tumor", "Stroma"]]
    assert res.labels[0] == -1
    largest = labels_from_annotations(anns, COORDS, P, min_fraction=0.5, on_conflict="largest")
    assert largest.labels[0] == 0 and largest.conflicts.tolist() == [0]


def test_ignore_classes_never_become_labels_and_mask_what_they_cover():
    anns = [
        shape("Stroma", rect(0, 0, 300, 100)),
        shape("Ignore*", rect(200, 0, 300, 100)),
        Annotation([], "Point", "Tumor", raw_geometry={"type": "Point", "coordinates": [1, 2]}),
        shape(None, rect(0, 0, 10, 10)),
    ]
    res = labels_from_annotations(anns, COORDS, P)
    assert res.class_names == ["Stroma"]
    assert res.excluded_classes == ["Ignore*"]
    assert res.labels.tolist() == [0, 0, -1] and res.ignored.tolist() == [False, False, True]
    assert res.counts == {"Stroma": 2}
    assert any("without a class" in note for note in res.skipped)


def test_given_class_order_is_kept_and_unknown_classes_are_noted():
    anns = [shape("Tumor", rect(0, 0, 100, 100)), shape("Fat", rect(100, 0, 200, 100))]
    res = labels_from_annotations(anns, COORDS, P, class_names=["Stroma", "Tumor"])
    assert res.labels.tolist() == [1, -1, -1]
    assert res.fractions.shape == (3, 2)
    assert any("Fat" in note for note in res.skipped)
