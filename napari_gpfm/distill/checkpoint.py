"""Training checkpoints: safetensors weights + a weights-only torch file for the rest.

``<output.dir>/checkpoints/step_<N>/`` holds ``weights.safetensors`` (``student.*``,
``teacher.*`` and the loss centres ``losses.*``), ``state.pt`` (next step, optimizer, grad scaler
and RNG states as tensors; read with ``weights_only=True``) and the merged ``config.yaml``.
A checkpoint directory appears atomically (written under a temporary name, then renamed) and
``LATEST`` names the newest one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import Config, save_config
from .meta_arch import DistillMetaArch

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "LATEST"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
WEIGHT_PARTS = ("student", "teacher", "losses")


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
    """Write the checkpoint that resumes at ``next_step``; keep the newest ``keep`` ones.

    ``extra`` holds run bookkeeping numbers (e.g. accumulated wall time) returned on load.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step_{next_step:08d}"
    tmp = root / f".tmp_step_{next_step:08d}"
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
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / LATEST_FILE).write_text(final.name)
    if keep > 0:
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``output_dir``, if any."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    latest = root / LATEST_FILE
    if latest.is_file() and (root / latest.read_text().strip() / STATE_FILE).is_file():
        return root / latest.read_text().strip()
    return None


def load_checkpoint(
    path: str | Path,
    meta: DistillMetaArch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> tuple[int, dict[str, float]]:
    """Restore everything saved by :func:`save_checkpoint` (strictly).

    Returns the step to run next and the checkpoint's ``extra`` numbers.
    """
    path = Path(path)
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
