"""Training checkpoints: safetensors weights + a weights-only torch file for the rest.

``<output.dir>/checkpoints/step_<N>/`` holds ``weights.safetensors`` (``student.*``,
``teacher.*`` and the loss centres ``losses.*``), ``state.pt`` (next step, optimizer, grad scaler
and RNG states as tensors; read with ``weights_only=True``) and the merged ``config.yaml``.

Nothing is lost to a kill at any point:

- a checkpoint directory appears atomically: written (and fsynced) under a temporary name, then
  renamed;
- ``LATEST`` names the newest one and is itself replaced atomically (temporary file, fsync,
  rename);
- resuming (:func:`find_checkpoint`) uses ``LATEST`` when it names a complete checkpoint and no
  newer complete one exists; when ``LATEST`` is missing, empty, unreadable or dangling it scans
  the folder for the newest complete checkpoint, and says so;
- pruning (``train.keep_checkpoints``) never deletes the checkpoint just saved nor the one
  ``LATEST`` names (the ones a message may show the user);
- a run that does not continue the folder's newest checkpoint (``train.resume: false``, or an
  explicit older checkpoint) first moves the later checkpoints of the earlier run aside
  (:func:`set_aside_later_checkpoints`), so they are neither pruned nor mistaken for this run's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from napari_gpfm.errors import NapariGpfmError

from .config import Config, save_config
from .meta_arch import DistillMetaArch

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "LATEST"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
SUPERSEDED_DIR = "superseded"
WEIGHT_PARTS = ("student", "teacher", "losses")
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp_step_"


class CheckpointResumeError(NapariGpfmError, RuntimeError):
    """A checkpoint chosen for resuming cannot be read back (the message names it)."""


def _tensors(meta: DistillMetaArch) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in WEIGHT_PARTS:
        for key, value in getattr(meta, part).state_dict().items():
            out[f"{part}.{key}"] = value.detach().cpu().contiguous()
    return out


def rng_state() -> dict[str, torch.Tensor]:
    """CPU and CUDA generator states as uint8 tensors."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": torch.stack(cuda) if cuda else torch.empty(0)}


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# -- durability helpers --------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (not possible on every platform: then skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_latest(root: str | Path, name: str) -> Path:
    """Point ``<root>/LATEST`` at ``name`` atomically: a kill leaves the old or the new pointer,
    never an empty or partial one."""
    root = Path(root)
    latest = root / LATEST_FILE
    tmp = root / f".{LATEST_FILE}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, latest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(root)
    return latest


# -- finding checkpoints -------------------------------------------------------------------------
def checkpoint_step(path: str | Path) -> int | None:
    """N of a ``step_<N>`` directory name, else None."""
    match = STEP_DIR.match(Path(path).name)
    return int(match[1]) if match else None


def is_complete(path: str | Path) -> bool:
    """All three files present and whole: the safetensors header parses, ``state.pt`` is a
    whole zip archive (torch's format; its directory sits at the end of the file), and
    ``config.yaml`` is not empty. Reads no tensor."""
    path = Path(path)
    weights, state, config = path / WEIGHTS_FILE, path / STATE_FILE, path / CONFIG_FILE
    try:
        if not (config.is_file() and config.stat().st_size and state.is_file()):
            return False
        if not zipfile.is_zipfile(state):
            return False
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception:  # noqa: BLE001 (missing, truncated or foreign files are all "incomplete")
        return False
    return True


def _step_dirs(root: Path) -> list[Path]:
    """``step_<N>`` directories of ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``output_dir``, oldest step first."""
    return [p for p in _step_dirs(Path(output_dir) / CHECKPOINTS_DIR) if is_complete(p)]


def _read_latest(root: Path) -> tuple[str | None, str | None]:
    """(name LATEST holds, problem) with problem None when it names a directory of ``root``."""
    latest = root / LATEST_FILE
    if not latest.exists():
        return None, "is missing"
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"is unreadable ({exc})"
    if not name:
        return None, "is empty (the run was killed while writing it)"
    if checkpoint_step(name) is None or Path(name).name != name:
        return None, f"holds {name[:60]!r}, not the name of a checkpoint"
    if not (root / name).is_dir():
        return name, f"names {name}, which does not exist (deleted or moved)"
    if not is_complete(root / name):
        return name, f"names {name}, which is incomplete"
    return name, None


def find_checkpoint(output_dir: str | Path) -> tuple[Path | None, str | None]:
    """The checkpoint to resume from in ``output_dir`` and a note when ``LATEST`` could not be
    trusted (``(None, None)`` for a folder without checkpoints).

    ``LATEST`` wins when it names a complete checkpoint and none newer exists; otherwise the
    newest complete checkpoint found by scanning is used.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = complete_checkpoints(output_dir)
    newest = found[-1] if found else None
    name, problem = _read_latest(root)
    latest = root / LATEST_FILE
    if problem is None:
        target = root / name
        if newest is not None and checkpoint_step(newest) > checkpoint_step(target):
            return newest, (f"{newest.name} is newer than {name} named by {latest} (the run "
                            f"stopped between saving it and updating {LATEST_FILE}); resuming "
                            f"from {newest}")
        return target, None
    if newest is None:
        if problem == "is missing":
            return None, None
        return None, (f"{latest} {problem}, and no complete checkpoint was found in {root}: "
                      "starting from step 0")
    return newest, (f"{latest} {problem}; resuming from {newest}, the newest complete "
                    f"checkpoint found by scanning {root}")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``output_dir``, if any."""
    return find_checkpoint(output_dir)[0]


# -- saving and pruning --------------------------------------------------------------------------
def prune_checkpoints(root: str | Path, keep: int, protect: set[Path] | frozenset = frozenset()
                      ) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints of ``root`` (``keep`` 0: keep all),
    never one in ``protect`` nor the one ``LATEST`` names, and leftovers of killed saves.
    Returns what was deleted."""
    root = Path(root)
    deleted: list[Path] = []
    for tmp in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep <= 0:
        return deleted
    name, problem = _read_latest(root)
    kept = {p.resolve() for p in protect}
    if name is not None:
        kept.add((root / name).resolve())
    for old in _step_dirs(root)[:-keep]:
        if old.resolve() in kept:
            continue
        shutil.rmtree(old, ignore_errors=True)
        deleted.append(old)
    return deleted


def save_checkpoint(
    output_dir: str | Path,
    next_step: int,
    meta: DistillMetaArch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    cfg: Config,
    keep: int,
    extra: dict[str, float] | None = None,
) -> Path:
    """Write the checkpoint that resumes at ``next_step``; keep the newest ``keep`` ones (and
    always this one).

    ``extra`` holds run bookkeeping numbers (e.g. accumulated wall time) returned on load.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step_{next_step:08d}"
    tmp = root / f"{TMP_PREFIX}{next_step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_tensors(meta), tmp / WEIGHTS_FILE)
    state: dict[str, Any] = {
        "step": next_step,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    torch.save(state, tmp / STATE_FILE)
    save_config(cfg, tmp)
    for name in (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    replaced = None
    if final.exists():  # the same step saved again: swap, so a complete copy always exists
        replaced = root / f".replaced_{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    tmp.rename(final)
    _fsync_dir(root)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    write_latest(root, final.name)
    prune_checkpoints(root, keep, {final})
    return final


def set_aside_later_checkpoints(output_dir: str | Path, start_step: int,
                                keep: Path | None = None) -> tuple[Path | None, list[Path]]:
    """Move the checkpoints of ``output_dir`` past ``start_step`` (an earlier run's, which this
    run does not continue), with ``LATEST`` and a copy of ``log.csv``, into
    ``<output_dir>/superseded/<time>/``; ``keep`` (the checkpoint resumed from) stays.

    Returns (that folder, the checkpoints moved); (None, []) when there were none.
    """
    out = Path(output_dir)
    root = out / CHECKPOINTS_DIR
    keep_resolved = keep.resolve() if keep is not None else None
    later = [p for p in _step_dirs(root)
             if (checkpoint_step(p) or 0) > start_step and p.resolve() != keep_resolved]
    if not later:
        return None, []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out / SUPERSEDED_DIR / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = out / SUPERSEDED_DIR / f"{stamp}-{n}"
    (dest / CHECKPOINTS_DIR).mkdir(parents=True)
    moved = []
    for path in later:
        target = dest / CHECKPOINTS_DIR / path.name
        path.rename(target)
        moved.append(target)
    name, _ = _read_latest(root)
    if name is not None and name in {p.name for p in moved}:
        (root / LATEST_FILE).rename(dest / CHECKPOINTS_DIR / LATEST_FILE)
    log = out / "log.csv"
    if log.is_file():
        shutil.copy2(log, dest / "log.csv")
    _fsync_dir(root)
    return dest, moved


def load_checkpoint(
    path: str | Path,
    meta: DistillMetaArch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> tuple[int, dict[str, float]]:
    """Restore everything saved by :func:`save_checkpoint` (strictly).

    Returns the step to run next and the checkpoint's ``extra`` numbers. A checkpoint that
    cannot be read back, or does not fit this run's model, raises
    :class:`CheckpointResumeError` naming it.
    """
    path = Path(path)
    try:
        tensors = load_file(path / WEIGHTS_FILE)
        for part in WEIGHT_PARTS:
            prefix = f"{part}."
            sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            getattr(meta, part).load_state_dict(sub, strict=True)
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return int(state["step"]), dict(state["extra"])
    except Exception as exc:  # noqa: BLE001 (safetensors, torch and strict loading raise many)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointResumeError(
            f"{path}: cannot resume from this checkpoint ({type(exc).__name__}: {first}). "
            "Is it from a run with another student or heads config? Move it away to resume from "
            "an older one, set train.resume=false to start again, or choose another output.dir."
        ) from exc
