"""Annotated regions where no patch was embedded are never dropped silently."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from level0_shapes import rect

from napari_gpfm.annotations.geojson import Annotation
from napari_gpfm.annotations.labels import (
    ClassCoverage,
    labels_from_annotations,
    unlabelled_reasons,
)

P = 100
# embedded patches: a 10 x 10 grid over [0, 1000)², the "detected tissue"
COORDS = np.array([[x, y] for y in range(0, 1000, P) for x in range(0, 1000, P)], np.int64)
OUTSIDE = ("class 'Background': 2 annotations cover no embedded patch — they lie outside the "
           "detected tissue; embed with the whole image (tissue 'none') to include them")


def tissue_and_background():
    """What a user draws: tissue inside the mask, background (glass) outside it."""
    return [
        Annotation([[rect(0, 0, 500, 500)]], class_name="Tissue"),
        Annotation([[rect(2000, 0, 2600, 400)]], class_name="Background"),
        Annotation([[rect(0, 1500, 800, 1900)]], class_name="Background"),
        Annotation([[rect(600, 0, 800, 200)]], class_name="Ignore*"),
    ]


def test_each_class_reports_its_annotations_and_patches():
    pl = labels_from_annotations(tissue_and_background(), COORDS, P)
    assert pl.class_names == ["Tissue", "Background"]
    assert pl.coverage == {
        "Tissue": ClassCoverage(annotations=1, touched=25, labelled=25),
        "Background": ClassCoverage(annotations=2, touched=0, labelled=0),
        "Ignore*": ClassCoverage(annotations=1, touched=4, labelled=4),
    }
    assert pl.empty_classes == {"Background": OUTSIDE}
    assert OUTSIDE in pl.skipped
    assert unlabelled_reasons(pl) == [OUTSIDE] == unlabelled_reasons(pl, ["Background"])
    assert unlabelled_reasons(pl, ["Tissue"]) == []


def test_a_class_touching_patches_too_little_says_so():
    anns = [Annotation([[rect(0, 0, 500, 500)]], class_name="Tissue"),
            Annotation([[rect(520, 520, 560, 600)]], class_name="Vessel")]
    pl = labels_from_annotations(anns, COORDS, P)
    assert pl.coverage["Vessel"] == ClassCoverage(1, 1, 0)
    assert pl.empty_classes["Vessel"] == (
        "class 'Vessel': 1 annotation touches 1 embedded patch but covers none of them by at "
        "least 50% (at most 32%) — draw larger regions or lower the minimum coverage")
    one_outside = labels_from_annotations(
        [Annotation([[rect(5000, 0, 5100, 100)]], class_name="Glass")], COORDS, P)
    assert one_outside.empty_classes["Glass"].startswith(
        "class 'Glass': 1 annotation covers no embedded patch — it lies outside the detected "
        "tissue;")
    assert one_outside.empty_classes["Glass"].endswith("to include it")


def test_a_class_lost_to_conflicts_says_so():
    anns = [Annotation([[rect(0, 0, 300, 300)]], class_name="A"),
            Annotation([[rect(0, 0, 300, 300)]], class_name="B"),
            Annotation([[rect(500, 500, 900, 900)]], class_name="C")]
    pl = labels_from_annotations(anns, COORDS, P)
    assert set(pl.empty_classes) == {"A", "B"}
    assert "also claimed by another class" in pl.empty_classes["A"]
    assert pl.counts["C"] == 16


def _store():
    rng = np.random.default_rng(0)
    return SimpleNamespace(coords=COORDS, patch_size_level0=P, mpp=0.5, model="m", recipe=None,
                           features=rng.normal(size=(len(COORDS), 8)).astype(np.float32),
                           path="slide.h5", slide_name="slide")


def test_the_probe_says_why_a_class_is_missing():
    from napari_gpfm.analyses.classify import ProbeRequest, live_steps, train_probe

    anns = tissue_and_background()
    with pytest.raises(ValueError) as info:
        train_probe(anns, _store(), ["Tissue", "Background"])
    msg = str(info.value)
    assert "a probe needs labelled patches of at least two classes, got ['Tissue']" in msg
    assert OUTSIDE in msg
    (status,) = list(live_steps(ProbeRequest(anns, _store(), ["Tissue", "Background"])))
    assert status.kind == "status" and OUTSIDE in status.message


def test_reasons_survive_labels_rebuilt_without_the_field():
    from napari_gpfm.analyses.classify import merge_labels

    pl = labels_from_annotations(tissue_and_background(), COORDS, P)
    merged = merge_labels(pl, labels_from_annotations([], COORDS, P, ["Tissue", "Background"]))
    assert unlabelled_reasons(merged, ["Tissue", "Background"]) == [OUTSIDE]
