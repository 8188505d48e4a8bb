"""distill_job over iter_distillation on a tiny ViT/14 and the 32 real H&E tiles (CPU): records
and the exported student; stop event; closing saves a checkpoint that resumes; closing before
the start runs nothing."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import pytest

from jobs_helpers import TILES, assert_progress, drive
from napari_gpfm.distill import DistillResult, StepRecord
from napari_gpfm.distill.checkpoint import latest_checkpoint
from napari_gpfm.jobs import distill_job

TINY = {
    "student": {"arch": "vit_small_patch14_dinov2",
                "kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 2}},
    "teacher": {"warmup_temp_steps": 0},
    "dino": {"n_prototypes": 64, "hidden_dim": 64, "bottleneck_dim": 32},
    "crops": {"global_size": 56, "local_size": 28, "local_number": 2},
    "optim": {"lr": 1.0e-3, "lr_scaling": "none"},
    "schedules": {"warmup_steps": 1},
    "train": {"steps": 3, "batch_size": 4, "precision": "fp32", "progress": False,
              "tensorboard": False, "checkpoint_every": 1000},
    "data": {"tiles": [str(TILES)], "num_workers": 0},
}


@pytest.fixture
def config(tmp_path):
    if not TILES.is_dir():
        pytest.skip(f"real H&E tiles not found at {TILES}")
    from napari_gpfm.distill import load_config

    def make(run: str = "run", steps: int = 3):
        return load_config(None, _dotlist(TINY) + [f"output.dir={tmp_path / run}",
                                                   f"output.models_dir={tmp_path / 'models'}",
                                                   f"train.steps={steps}"])

    return make


def _dotlist(tree: dict, prefix: str = "") -> list[str]:
    import json

    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _dotlist(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def _leftovers(out_dir: Path) -> list[str]:
    return [p.name for p in (out_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_records_and_the_exported_student(config):
    cfg = config()
    records, result = drive(distill_job(cfg))
    assert_progress(records, "distill")
    assert {r.stage for r in records} == {"training"} and {r.unit for r in records} == {"steps"}
    assert [(r.status, r.done, r.total) for r in records] == [
        ("started", 0, 3), ("running", 1, 3), ("running", 2, 3), ("running", 3, 3),
        ("done", 3, 3)]
    steps = [r.data for r in records[1:-1]]
    assert all(isinstance(s, StepRecord) for s in steps) and [s.step for s in steps] == [0, 1, 2]
    assert {"total", "dino", "ibot", "koleo"} <= set(steps[0].losses)
    assert f"loss {steps[-1].losses['total']:.4f}" in records[-2].message
    assert records[2].rate is not None and records[1].rate is None  # rate from the 2nd step
    assert isinstance(result, DistillResult) and records[-1].data is result
    assert result.finished and result.card_path.is_file() and result.weights_path.is_file()
    assert result.card_path.stem in records[-1].message


def test_stop_event_and_closing_save_a_checkpoint_that_resumes(config):
    cfg = config(steps=4)
    out = Path(cfg["output"]["dir"])
    stop = threading.Event()
    records, stopped = drive(distill_job(cfg, stop),
                             lambda r: stop.set() if r.done == 1 else None)
    assert [r.done for r in records] == [0, 1, 1] and not stopped.finished
    assert stopped.next_step == 1 and "start again to resume" in records[-1].message
    assert latest_checkpoint(out).name == "step_00000001"

    gen = distill_job(cfg)  # resumes at step 1
    for r in gen:
        if r.status == "running":
            break
    assert r.done == 2  # the first step of this run is the run's second
    gen.close()
    assert gen.gi_frame is None
    assert latest_checkpoint(out).name == "step_00000002"  # saved on close
    assert _leftovers(out) == [] and not (out.parent / "models").exists()  # no export

    records, result = drive(distill_job(cfg))
    assert result.finished and [r.done for r in records] == [0, 3, 4, 4]
    with open(out / "log.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [0, 1, 2, 3]


def test_closing_before_the_start_builds_nothing(config):
    cfg = config("never")
    gen = distill_job(cfg)
    assert next(gen).status == "started"
    gen.close()
    assert not Path(cfg["output"]["dir"]).exists()
