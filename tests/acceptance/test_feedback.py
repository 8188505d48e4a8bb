"""What the screen tells a pathologist (issue 13): honest classifier feedback, exports at full
resolution with file dialogs, finetuned models in every model list at once, the loss history
across a resume. Docks come from the Plugins menu (``add_plugin_dock_widget``), buttons are
clicked, shapes drawn with the mouse; file dialogs are answered as a user would (their static
functions return what the user picked)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from mouse import draw_rectangle
from qtpy.QtWidgets import QFileDialog, QInputDialog
from user import (
    add_dock,
    choose_class,
    click,
    compute,
    gpfm_dock,
    new_window,
    open_slide,
    start_annotating,
    tick,
)


# ------------------------------------------------------------------------------ helpers
def box_around(state, indices) -> tuple[np.ndarray, np.ndarray]:
    """World corners (y, x) just inside the box around these patches."""
    boxes = state.boxes(indices).reshape(-1, 2)
    lo, hi = boxes.min(0), boxes.max(0)
    pad = 0.1 * state.patch_size_level0 * state.mpp  # a tenth of a patch
    return lo + pad, hi - pad


def block(state, start: int) -> list[int]:
    """A 2×2 block of neighbouring patches, the first found from ``start`` on (row order)."""
    order = np.lexsort((state.coords[:, 0], state.coords[:, 1]))
    order = order if start == 0 else order[::-1]
    P = state.patch_size_level0
    where = {tuple(c): i for i, c in enumerate(state.coords.tolist())}
    for i in order:
        x, y = state.coords[i]
        quad = [where.get((x + dx, y + dy)) for dx, dy in ((P, 0), (0, P), (P, P))]
        if None not in quad:
            return [int(i), *quad]
    raise AssertionError("no 2x2 block of patches")


def columns(state, first: bool) -> list[int]:
    """The patches of the grid's leftmost (``first``) or rightmost columns, about 40 % of the
    patches (the columns of a patch do not hold as many patches each)."""
    x = np.sort(state.coords[:, 0])
    if first:
        sel = state.coords[:, 0] < x[int(0.4 * len(x))]
    else:
        sel = state.coords[:, 0] > x[int(0.6 * len(x))]
    return np.flatnonzero(sel).tolist()


def table_cells(table) -> list[list[str]]:
    return [[table.item(r, c).text() for c in range(table.columnCount())]
            for r in range(table.rowCount())]  # fmt: skip


def annotated_window(make_napari_viewer, qtbot, sample_svs):
    """A window with the sample slide embedded (GPFM dock), two classes and a Shapes layer
    (Annotate dock); returns (viewer, slide layer, GPFM dock, Annotate dock, state, shapes)."""
    viewer = new_window(make_napari_viewer)
    layer = open_slide(viewer, sample_svs)
    gpfm = gpfm_dock(viewer, qtbot)
    compute(qtbot, gpfm)
    annotate = add_dock(viewer, "Annotate and classify")
    state = annotate.session.slide(layer)
    shapes = start_annotating(viewer, qtbot, annotate)
    return viewer, layer, gpfm, annotate, state, shapes


def draw(qtbot, viewer, annotate, state, shapes, cls: str, indices) -> None:
    choose_class(qtbot, annotate, cls)
    draw_rectangle(qtbot, viewer, shapes, *box_around(state, indices))


def train(qtbot, annotate) -> None:
    with qtbot.waitSignal(annotate.jobs.finished, timeout=60_000) as blocker:
        click(qtbot, annotate.train_button)
    assert blocker.args == ["done"], annotate.status_label.text()


# ------------------------------------------------------------------------------ tests
def test_small_sample_warnings_come_and_go(make_napari_viewer, qtbot, sample_svs):
    """Counts per class up front; a visible warning with a handful of patches, gone once each
    class has enough and the cross-validation holds enough patches."""
    viewer, _, _, annotate, state, shapes = annotated_window(make_napari_viewer, qtbot,
                                                             sample_svs)  # fmt: skip
    draw(qtbot, viewer, annotate, state, shapes, "Tumour", block(state, 0))
    draw(qtbot, viewer, annotate, state, shapes, "Stroma", block(state, -1))
    train(qtbot, annotate)
    counts = table_cells(annotate.counts_table)
    assert counts == [["Tumour", "4"], ["Stroma", "4"]]
    warning = annotate.warning_label
    assert warning.isVisibleTo(annotate), "no warning with 4 patches per class"
    text = warning.text()
    assert "Tumour 4" in text and "Stroma 4" in text and "20" in text
    assert "8 patches" in text and "30" in text  # the cross-validation holds only 8
    assert "balanced accuracy" in annotate.accuracy_label.text()

    # enough patches of each class: the warning goes
    viewer.layers.selection.active = shapes
    shapes.selected_data = set(range(len(shapes.data)))
    shapes.remove_selected()
    left, right = columns(state, True), columns(state, False)
    assert min(len(left), len(right)) >= 20
    draw(qtbot, viewer, annotate, state, shapes, "Tumour", left)
    draw(qtbot, viewer, annotate, state, shapes, "Stroma", right)
    train(qtbot, annotate)
    counts = dict(table_cells(annotate.counts_table))
    assert int(counts["Tumour"]) >= 20 and int(counts["Stroma"]) >= 20
    assert not warning.isVisibleTo(annotate), warning.text()


def test_pathotune_and_probe_maps_side_by_side(make_napari_viewer, qtbot, sample_svs):
    """PathoTune paints its class map and the same-split linear probe's beside it; a table gives
    both validation scores on the same split; the split and its warning show before training."""
    viewer, layer, _, annotate, state, shapes = annotated_window(make_napari_viewer, qtbot,
                                                                 sample_svs)  # fmt: skip
    draw(qtbot, viewer, annotate, state, shapes, "Tumour", columns(state, True))
    draw(qtbot, viewer, annotate, state, shapes, "Stroma", columns(state, False))
    pt = add_dock(viewer, "PathoTune (prompt tuning)")
    tick(qtbot, pt.random_check)
    tick(qtbot, pt.ttp_check)  # text prompts off: no text encoder to load
    pt.epochs_spin.setValue(1)
    pt.n_spin.setValue(2)
    with qtbot.waitSignal(pt.jobs.finished, timeout=180_000) as blocker:
        click(qtbot, pt.train_button)
    assert blocker.args == ["done"], pt.status.text()
    # model loading said what it was doing, step by step
    steps = pt.loading_steps
    assert any("importing torch" in m for m in steps), steps
    assert any("building vit_small_patch14_dinov2" in m for m in steps), steps
    res = pt.last
    qtbot.waitUntil(lambda: f"{layer.name} · probe uncertainty" in viewer.layers, timeout=10_000)
    mine, probe = (viewer.layers[f"{layer.name} · {w} classes"] for w in ("PathoTune", "probe"))
    assert mine.data.shape == probe.data.shape
    assert tuple(mine.translate) == pytest.approx(tuple(probe.translate))
    g = state.grid
    painted = np.asarray(probe.data)[g.rows, g.cols] - 1
    assert painted.tolist() == res.probe_prediction.labels.tolist()
    cells = table_cells(pt.compare_table)
    assert [row[0] for row in cells] == [res.train.classifier.config.label, "linear probe"]
    assert float(cells[0][1]) == pytest.approx(res.train.val_bal_acc, abs=5e-4)
    assert float(cells[1][1]) == pytest.approx(res.probe_val_bal_acc, abs=5e-4)
    n_val = len(res.train.val_indices)
    assert cells[0][2:4] == cells[1][2:4] == [str(res.split.n_train), str(n_val)]
    # labelled / train / validation per class, and the warning: validation under 30 patches
    counts = {row[0]: row[1:] for row in table_cells(pt.counts_table)}
    assert counts["Tumour"][0] == str(res.labels.counts["Tumour"])
    assert sum(int(v[2]) for v in counts.values()) == n_val
    assert n_val < 30
    assert pt.warning_label.isVisibleTo(pt)
    assert f"holds only {n_val} patches" in pt.warning_label.text()


def test_full_resolution_exports_with_dialogs(make_napari_viewer, qtbot, sample_svs, tmp_path,
                                              monkeypatch):  # fmt: skip
    """Maps as pyramid TIFFs at the slide's level-0 size (or the resolution picked), their
    pixels the patch values at patch centres; tables and GeoJSON default into the project
    folder."""
    viewer, layer, gpfm, annotate, state, shapes = annotated_window(make_napari_viewer, qtbot,
                                                                    sample_svs)  # fmt: skip
    with qtbot.waitSignal(gpfm.cluster_jobs.finished, timeout=30_000):
        click(qtbot, gpfm.cluster_button)
    w, h = state.slide.dimensions
    P = state.patch_size_level0
    cx, cy = state.coords[:, 0] + P // 2, state.coords[:, 1] + P // 2
    asked: dict[str, str] = {}

    def save_as(name):
        def dialog(parent, title, default, filters="", *a, **k):
            asked[title] = default
            return str(tmp_path / name), filters.split(";;")[0]
        return dialog

    def pick_resolution(which):
        def dialog(parent, title, label, items, *a, **k):
            return [i for i in items if i.startswith(which)][0], True
        return dialog

    # the cluster map (GPFM dock), full resolution
    monkeypatch.setattr(QFileDialog, "getExistingDirectory",
                        lambda *a, **k: str(tmp_path / "maps"))
    (tmp_path / "maps").mkdir()
    monkeypatch.setattr(QInputDialog, "getItem", pick_resolution("full resolution"))
    with qtbot.waitSignal(gpfm.jobs.finished, timeout=60_000) as blocker:
        click(qtbot, gpfm.export_buttons["png"])
    assert blocker.args == ["done"], gpfm.status.text()
    tif = tmp_path / "maps" / f"{layer.name}_clusters.tif"
    with tifffile.TiffFile(tif) as t:
        full = t.pages[0].asarray()
        assert len(t.series[0].levels) > 1  # a pyramid
    assert full.shape == (h, w)
    assert (full[cy, cx] == state.clusters.labels + 1).all()
    assert (tmp_path / "maps" / f"{layer.name}_clusters.png").exists()  # per patch too
    dist = tifffile.imread(tmp_path / "maps" / f"{layer.name}_distance_to_centre.tif")
    np.testing.assert_allclose(dist[cy, cx], state.values["distance_to_centre"], rtol=1e-6)

    # the per-patch table and GeoJSON: the dialogs open in the project folder
    monkeypatch.setattr(QFileDialog, "getSaveFileName", save_as("table.csv"))
    with qtbot.waitSignal(gpfm.jobs.finished, timeout=60_000):  # written in the background
        click(qtbot, gpfm.export_buttons["table"])
    assert asked["Per-patch table"].startswith(str(gpfm.session.out_dir))
    assert len((tmp_path / "table.csv").read_text().splitlines()) == state.n + 1
    monkeypatch.setattr(QFileDialog, "getSaveFileName", save_as("patches.geojson"))
    with qtbot.waitSignal(gpfm.jobs.finished, timeout=60_000):
        click(qtbot, gpfm.export_buttons["geojson"])
    assert asked["QuPath GeoJSON"].startswith(str(gpfm.session.out_dir))
    assert (tmp_path / "patches.geojson").exists()
    assert (tmp_path / "patches_clusters.geojson").exists()

    # the probe's class map (Annotate dock) at 1/4 of level 0
    draw(qtbot, viewer, annotate, state, shapes, "Tumour", columns(state, True))
    draw(qtbot, viewer, annotate, state, shapes, "Stroma", columns(state, False))
    train(qtbot, annotate)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", save_as("probe.tif"))
    monkeypatch.setattr(QInputDialog, "getItem", pick_resolution("1/4"))
    with qtbot.waitSignal(annotate.apply_jobs.finished, timeout=60_000) as blocker:
        click(qtbot, annotate.export_map_button)
    assert blocker.args == ["done"], annotate.apply_jobs.status.text()
    assert asked["Export the class map"].startswith(str(annotate.session.out_dir))
    quarter = tifffile.imread(tmp_path / "probe.tif")
    assert quarter.shape == (-(-h // 4), -(-w // 4))
    pred = annotate._predictions[state.uid]
    assert (quarter[cy // 4, cx // 4] == pred.labels + 1).all()
    rows = (tmp_path / "probe.csv").read_text().splitlines()
    assert rows[0].startswith("x,y,class,class_name,prob_") and len(rows) == state.n + 1
    assert (tmp_path / "probe.geojson").exists()
    # the annotations' GeoJSON defaults into the project folder too
    monkeypatch.setattr(QFileDialog, "getSaveFileName", save_as("shapes.geojson"))
    click(qtbot, annotate.export_button)
    assert asked["QuPath GeoJSON"].startswith(str(annotate.session.out_dir))
    assert (tmp_path / "shapes.geojson").exists()


FINETUNE_EXTRA = "train.progress=false data.num_workers=0 train.batch_size=4 crops.local_number=2"


def finetune_dock(viewer, qtbot, tmp_path, name: str, steps: int):
    ft = add_dock(viewer, "Finetune (distillation)")
    ft.config_combo.setCurrentText("tiny_cpu")
    assert ft.name_edit.text().startswith("tiny_cpu-")  # a readable default: config + date
    assert "minute-scale CPU run" in ft.config_info.text()  # the config's description
    assert "steps to run ≈" in ft.config_info.text()  # and its duration here
    ft.name_edit.clear()
    qtbot.keyClicks(ft.name_edit, name)
    ft.out_edit.setText(str(tmp_path / "runs"))
    ft.steps_spin.setValue(steps)
    ft.extra_edit.setText(FINETUNE_EXTRA)
    return ft


def test_finetuned_model_appears_in_every_model_list(make_napari_viewer, qtbot, sample_svs,
                                                     tmp_path):  # fmt: skip
    viewer = new_window(make_napari_viewer)
    open_slide(viewer, sample_svs)
    gpfm = add_dock(viewer, "GPFM")
    pt = add_dock(viewer, "PathoTune (prompt tuning)")
    ft = finetune_dock(viewer, qtbot, tmp_path, "My-Student", 2)
    assert gpfm.model_combo.findData("my-student") < 0
    with qtbot.waitSignal(ft.jobs.finished, timeout=240_000) as blocker:
        click(qtbot, ft.start_button)
    assert blocker.args == ["done"], ft.status.text()
    assert ft.result.finished and ft.result.card_path.stem == "my-student"
    # at once (within a turn or two of the event loop), without reopening any dock
    assert gpfm.model_combo.findData("my-student") >= 0
    qtbot.waitUntil(lambda: pt.model_combo.findText("my-student") >= 0, timeout=1000)
    qtbot.waitUntil(lambda: any(ft.models_list.item(i).text().startswith("my-student")
                                for i in range(ft.models_list.count())), timeout=1000)
    # the measured time per step now gives this machine's estimate
    ft.update_info()
    assert "measured on this machine" in ft.config_info.text()


def test_loss_history_is_kept_across_resume(make_napari_viewer, qtbot, sample_svs, tmp_path):
    viewer = new_window(make_napari_viewer)
    open_slide(viewer, sample_svs)
    ft = finetune_dock(viewer, qtbot, tmp_path, "resumed", 40)
    click(qtbot, ft.start_button)
    qtbot.waitUntil(lambda: len(ft.plot.values) >= 2, timeout=120_000)
    with qtbot.waitSignal(ft.jobs.finished, timeout=120_000):
        click(qtbot, ft.stop_button)
    first = list(ft.plot.values)
    k = ft.result.next_step
    assert not ft.result.finished and len(first) == k
    assert f"resuming at step {k + 1}" in ft.config_info.text()
    with qtbot.waitSignal(ft.jobs.finished, timeout=120_000):
        click(qtbot, ft.start_button)
        assert ft.plot.values[:k] == pytest.approx(first)  # the history, before any new step
        qtbot.waitUntil(lambda: len(ft.plot.values) > k, timeout=120_000)
        click(qtbot, ft.stop_button)
    assert ft.plot.steps[:k] == list(range(k)) and ft.plot.values[:k] == pytest.approx(first)
    assert ft.plot.steps[k] == k  # the resumed run continues the curve
