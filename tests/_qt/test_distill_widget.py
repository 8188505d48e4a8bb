"""The finetune dock runs a real (tiny) distillation in the background, shows loss, and stops.
The dock is added as the Plugins menu adds it (``add_plugin_dock_widget``)."""

from __future__ import annotations

import json

import pytest
from plugin_docks import add_dock, click, open_slide

from napari_gpfm._qt.distill_widget import run_overrides


def test_overrides_carry_the_users_choices():
    out = run_overrides(["/a b.svs"], "/tiles", "/runs/x", 50, "train.batch_size=8")
    assert out[0] == 'data.slides=["/a b.svs"]'
    assert "train.steps=50" in out and "train.batch_size=8" in out
    assert 'data.tiles=["/tiles"]' in out
    assert not any(o.startswith("train.steps") for o in run_overrides([], "", "/r", 0, ""))
    named = run_overrides([], "", "/r", 0, "", "my-model")
    assert 'output.model_name="my-model"' in named


@pytest.fixture
def widget(make_napari_viewer, sample_svs, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(tmp_path / "models"))
    viewer = make_napari_viewer()
    open_slide(viewer, sample_svs)
    w = add_dock(viewer, "distill")
    w.config_combo.setCurrentText("tiny_cpu")
    w.out_edit.setText(str(tmp_path / "run"))
    w.extra_edit.setText("train.progress=false data.num_workers=0 train.batch_size=4 crops.local_number=2")
    return w


def test_run_to_the_end_exports_a_student(widget, qtbot, tmp_path):
    assert widget.selected_slides() == [str(widget.viewer.layers[0].metadata["napari_gpfm"]["path"])]
    # a one-line description and an estimate for the config; a readable default name
    assert widget.config_info.text().startswith("A minute-scale CPU run")
    assert "200 of 200 steps to run ≈" in widget.config_info.text()
    assert widget.name_edit.text().startswith("tiny_cpu-20")
    widget.steps_spin.setValue(3)
    assert "3 of 3 steps to run" in widget.config_info.text()
    widget.start_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.result is not None and widget.result.finished
    assert widget.progress.value() == 3
    assert len(widget.plot.values) == 3
    assert "student saved" in widget.status.text()
    card = widget.result.card_path
    assert card.exists() and card.parent == tmp_path / "models"
    assert card.stem == widget.name_edit.text()  # registered under the name chosen
    assert widget.result.output_dir == tmp_path / "run" / card.stem


def test_stop_saves_a_checkpoint_and_start_resumes(widget, qtbot):
    widget.steps_spin.setValue(40)
    widget.start_button.click()
    qtbot.waitUntil(lambda: len(widget.plot.values) >= 2, timeout=120_000)
    widget.stop_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    first = widget.result
    assert not first.finished and 2 <= first.next_step < 40
    assert "Start again to resume" in widget.status.text()
    widget.start_button.click()
    widget.stop_button.click()  # stops after at most one more step
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    # resumed: a restart from scratch would stop at step 0 or 1
    assert widget.result.next_step in (first.next_step, first.next_step + 1)


def test_start_from_a_registry_model_or_a_file(widget, tmp_path):
    from napari_gpfm._qt.distill_widget import RANDOM_START

    combo = widget.init_combo
    assert combo.itemText(0) == RANDOM_START and widget.init_value() is None
    # a dock beside the canvas of a 1280x800 window: the model names do not widen it
    assert combo.minimumSizeHint().width() <= 260, combo.minimumSizeHint()
    names = [combo.itemData(i) for i in range(combo.count())]
    assert "gpfm" in names and "uni" in names  # registry models a student can start from
    widget.set_init("gpfm")
    assert widget.init_value() == "gpfm"
    overrides = widget._overrides()
    assert "student.init=\"gpfm\"" in overrides
    assert "student.arch=\"vit_large_patch14_dinov2\"" in overrides
    # the typed overrides come last, so they still win
    assert overrides.index("student.arch=\"vit_large_patch14_dinov2\"") < overrides.index(
        "train.batch_size=4")
    assert "start from gpfm (vit_large_patch14_dinov2)" in widget.config_info.text()
    weights = tmp_path / "my.safetensors"
    weights.write_bytes(b"")
    widget.set_init(str(weights))
    assert widget.init_value() == str(weights)
    assert f"student.init={json.dumps(str(weights))}" in widget._overrides()
    widget.set_init(None)
    assert not any(o.startswith("student.init") for o in widget._overrides())


def test_the_dock_shows_the_teacher_information_and_the_collapse_warning(widget, qtbot,
                                                                          monkeypatch):
    from napari_gpfm.distill import collapse

    monkeypatch.setattr(collapse, "COLLAPSE_NATS", 1e9)  # every step counts as collapsed
    monkeypatch.setattr(collapse, "COLLAPSE_WINDOW", 2)
    shown: list[tuple[str, bool]] = []
    say = widget.jobs.say
    monkeypatch.setattr(widget.jobs, "say", lambda text, error=False: (
        shown.append((text, error)), say(text, error))[-1])
    widget.steps_spin.setValue(3)
    widget.start_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    steps = [(t, e) for t, e in shown if t.startswith("step ")]
    assert {t.split(":")[0] for t, _ in steps} == {"step 1/3", "step 2/3", "step 3/3"}
    assert all("teacher info" in t and "nats" in t for t, _ in steps)
    red = {t.split(":")[0] for t, e in steps if e and "⚠ collapse guard" in t}
    assert red == {"step 2/3", "step 3/3"}  # red from the warning on
    assert not any(e for t, e in steps if t.startswith("step 1/3"))
    assert widget.collapse_warning.startswith("collapse guard")
    assert widget.result.finished


@pytest.fixture
def errors(monkeypatch):
    from napari.utils import notifications

    seen: list[str] = []
    monkeypatch.setattr(notifications, "show_error", seen.append)
    return seen


def test_a_bad_config_value_ends_the_job_naming_the_key(widget, qtbot, errors):
    """A config is validated in the job's worker (that builds the student's meta model, too
    slow for the main thread): a bad value ends the run at once, named in the dock and in a
    notification, and nothing is trained. A misspelt key is refused before any job."""
    widget.steps_spin.setValue(3)
    widget.extra_edit.setText("train.stepz=3")
    click(qtbot, widget.start_button)
    assert not widget.jobs.busy
    assert "unknown config key 'train.stepz' (did you mean 'train.steps'?)" in widget.status.text()

    widget.extra_edit.setText("student.arch=vit_smal_patch14_dinov2 data.num_workers=0")
    with qtbot.waitSignal(widget.jobs.finished, timeout=60_000):
        click(qtbot, widget.start_button)
    text = widget.status.text()
    assert "Config 'tiny_cpu'" in text and "vit_smal_patch14_dinov2" in text, text
    assert errors and "student.arch" in errors[-1], errors
    assert widget.result is None and widget.plot.values == []
