"""No distillation progress lost: a damaged LATEST, pruning, a run that starts over in a used
folder. Resumed runs must equal an uninterrupted one exactly (same tensors at the last step)."""

from __future__ import annotations

import argparse
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from napari_gpfm.distill import checkpoint as ck
from napari_gpfm.distill.train import run_distillation

STEPS = 4
RUN = {"train.steps": STEPS, "train.checkpoint_every": 1, "train.keep_checkpoints": 2}


@pytest.fixture(scope="module")
def straight(tiny_config_module):
    """The uninterrupted reference run (4 steps)."""
    result = run_distillation(tiny_config_module("straight", **RUN))
    assert result.finished
    return result


def _stop_after(cfg, last_step: int):
    """Run until step ``last_step`` completes, then stop (a checkpoint is saved)."""
    event = threading.Event()

    def stop(record):
        if record.step == last_step:
            event.set()

    result = run_distillation(cfg, stop_event=event, on_log=stop)
    assert not result.finished and result.next_step == last_step + 1
    return result


def _assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a = load_file(a_dir / ck.WEIGHTS_FILE)
    b = load_file(b_dir / ck.WEIGHTS_FILE)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def test_an_empty_latest_resumes_from_the_newest_complete_checkpoint(
        straight, tiny_config_module, caplog):
    cfg = tiny_config_module("empty-latest", **RUN)
    _stop_after(cfg, 2)
    root = Path(cfg["output"]["dir"]) / ck.CHECKPOINTS_DIR
    assert _names(root) == ["step_00000002", "step_00000003"]  # two complete checkpoints
    (root / ck.LATEST_FILE).write_text("")  # killed while LATEST was written (before the fix)

    records = []
    with caplog.at_level(logging.WARNING, logger="napari_gpfm.distill"):
        resumed = run_distillation(cfg, on_log=records.append)
    assert records[0].step == 3  # from step_00000003, not from 0 nor the older step_00000002
    assert resumed.finished
    _assert_same_tensors(straight.checkpoint, resumed.checkpoint)
    note = resumed.notes[0]
    assert "LATEST is empty" in note and "resuming from" in note and "step_00000003" in note
    assert note in caplog.text


def test_a_dangling_latest_resumes_from_the_newest_complete_one_and_the_cli_says_so(
        straight, tiny_config_module, tmp_path, capsys):
    from napari_gpfm.distill import _cli

    cfg = tiny_config_module("dangling-latest", **RUN)
    _stop_after(cfg, 2)
    root = Path(cfg["output"]["dir"]) / ck.CHECKPOINTS_DIR
    shutil.rmtree(root / "step_00000003")  # LATEST still names it
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert _cli.run(argparse.Namespace(config=str(config_file), overrides=[])) == 0
    out, err = capsys.readouterr()
    assert "note: " in err and "names step_00000003, which does not exist" in err
    assert f"resuming from {root / 'step_00000002'}" in err
    assert "exported student card" in out
    _assert_same_tensors(straight.checkpoint, root / f"step_{STEPS:08d}")


def test_starting_over_in_a_used_folder_never_loses_the_checkpoint_it_names(
        straight, tiny_config_module):
    """train.resume=false where an earlier run left later checkpoints: the message names this
    run's checkpoint (pruning used to delete it), the earlier ones are kept aside, and the next
    run resumes this run's checkpoint."""
    cfg = tiny_config_module("start-over", **RUN, **{"train.resume": False})
    out = Path(cfg["output"]["dir"])
    shutil.copytree(straight.output_dir / ck.CHECKPOINTS_DIR, out / ck.CHECKPOINTS_DIR)
    earlier = _names(out / ck.CHECKPOINTS_DIR)
    assert earlier == ["step_00000003", "step_00000004"]

    stopped = _stop_after(cfg, 1)
    assert stopped.checkpoint == out / ck.CHECKPOINTS_DIR / "step_00000002"
    assert ck.is_complete(stopped.checkpoint)
    assert (out / ck.CHECKPOINTS_DIR / ck.LATEST_FILE).read_text() == "step_00000002"
    aside = list((out / ck.SUPERSEDED_DIR).glob(f"*/{ck.CHECKPOINTS_DIR}"))
    assert len(aside) == 1 and _names(aside[0]) == earlier  # nothing of the earlier run lost
    assert any("moved 2 later checkpoint(s)" in n for n in stopped.notes), stopped.notes

    records = []
    cfg["train"]["resume"] = True
    resumed = run_distillation(cfg, on_log=records.append)
    assert records[0].step == 2 and resumed.finished and not resumed.notes
    _assert_same_tensors(straight.checkpoint, resumed.checkpoint)


# -- units: pruning, LATEST, scanning -------------------------------------------------------------
def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    save_file({"student.x": torch.zeros(2)}, path / ck.WEIGHTS_FILE)
    torch.save({"step": step}, path / ck.STATE_FILE)
    (path / ck.CONFIG_FILE).write_text("train: {}\n")
    if not complete:  # cut short: the zip directory at its end is gone
        data = (path / ck.STATE_FILE).read_bytes()
        (path / ck.STATE_FILE).write_bytes(data[: len(data) // 2])
    return path


def test_pruning_never_deletes_the_checkpoint_just_saved_nor_the_one_latest_names(tmp_path):
    root = tmp_path / ck.CHECKPOINTS_DIR
    for step in (3, 50, 100, 200, 300):
        _fake_checkpoint(root, step)
    (root / f"{ck.TMP_PREFIX}00000400").mkdir()  # a save killed half-way
    ck.write_latest(root, "step_00000050")
    deleted = ck.prune_checkpoints(root, 2, {root / "step_00000003"})
    assert [p.name for p in deleted] == ["step_00000100"]
    assert _names(root) == ["step_00000003", "step_00000050", "step_00000200", "step_00000300"]
    assert not list(root.glob(f"{ck.TMP_PREFIX}*"))


def test_latest_is_replaced_atomically(tmp_path, monkeypatch):
    root = tmp_path / ck.CHECKPOINTS_DIR
    root.mkdir()
    ck.write_latest(root, "step_00000002")
    calls = []
    real_fsync = ck.os.fsync
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))

    def killed(src, dst):
        calls.append("replace")
        raise KeyboardInterrupt  # killed between writing the new pointer and the rename

    monkeypatch.setattr(ck.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.write_latest(root, "step_00000003")
    assert calls[:2] == ["fsync", "replace"]  # the new content is on disk before the rename
    assert (root / ck.LATEST_FILE).read_text() == "step_00000002"  # old pointer, whole
    assert sorted(p.name for p in root.iterdir()) == [ck.LATEST_FILE]  # no temporary left


@pytest.mark.parametrize("latest, problem", [
    (b"", "is empty"),
    (b"\xff\xfe\x00\x81", "is unreadable"),
    (b"step_00000009", "names step_00000009, which does not exist"),
    (b"step_00000004", "names step_00000004, which is incomplete"),
    (b"../../elsewhere/step_00000001", "holds '../../elsewhere/step_00000001', not the name"),
    (None, "is missing"),
])
def test_a_damaged_latest_is_worked_around_by_scanning(tmp_path, latest, problem):
    root = tmp_path / ck.CHECKPOINTS_DIR
    _fake_checkpoint(root, 1)
    _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 4, complete=False)
    if latest is not None:
        (root / ck.LATEST_FILE).write_bytes(latest)
    path, note = ck.find_checkpoint(tmp_path)
    assert path == root / "step_00000002"
    assert f"LATEST {problem}" in note and "newest complete checkpoint found by scanning" in note


def test_a_newer_complete_checkpoint_than_latest_wins(tmp_path):
    root = tmp_path / ck.CHECKPOINTS_DIR
    _fake_checkpoint(root, 1)
    _fake_checkpoint(root, 2)  # renamed into place, killed before LATEST was updated
    ck.write_latest(root, "step_00000001")
    path, note = ck.find_checkpoint(tmp_path)
    assert path == root / "step_00000002" and "newer than step_00000001" in note
    ck.write_latest(root, "step_00000002")
    assert ck.find_checkpoint(tmp_path) == (root / "step_00000002", None)
    assert ck.find_checkpoint(tmp_path / "nothing-here") == (None, None)


def test_a_missing_or_incomplete_resume_path_is_a_config_error(tiny_config, tmp_path):
    from napari_gpfm.distill.config import ConfigError

    for path, why in ((tmp_path / "nowhere", "no such directory"),
                      (_fake_checkpoint(tmp_path / "c", 4, complete=False),
                       "not a complete checkpoint")):
        cfg = tiny_config(**{"train.resume": str(path)})
        with pytest.raises(ConfigError, match=f"train.resume = '{path}': {why}"):
            run_distillation(cfg)
