"""Training throughput of GPFM distillation: images/s per optimiser step, markdown table.

Each case builds the real training run (``TrainingRun``: student, EMA teacher, experts, losses,
AdamW with schedules) and times ``train_step`` on one pre-collated batch, so JPEG decoding and
augmentation are excluded. The batch comes from the bundled sample slide (real H&E patches).

CPU cases: a tiny student and a ViT-S/14 student, each with self-distillation only and with
one small random expert. With CUDA, the GPU case: a ViT-L/14 student (GPFM recipe) with a ViT-L/16
expert (UNI-shaped, random init), bf16 autocast, reporting peak memory too.

    python bench/bench_distill.py [--steps 3] [--cpu-only]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from napari_gpfm.distill.config import load_config, nest_dotted
from napari_gpfm.distill.data import build_loader
from napari_gpfm.distill.train import TrainingRun

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDES = REPO / "sample_data"
WARMUP_STEPS = 1
SMALL_EXPERT = {
    "timm": {"name": "vit_small_patch16_224", "kwargs": {}},
    "cls_weight": 1.0, "patch_weight": 0.25,
}
TINY_EXPERT = {
    "timm": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "depth": 4}},
    "cls_weight": 1.0, "patch_weight": 0.25,
}
UNI_SHAPED_EXPERT = {
    "timm": {"name": "vit_large_patch16_224", "kwargs": {"init_values": 1.0e-5}},
    "cls_weight": 1.0, "patch_weight": 0.25,
}
VIT_S = {"student.arch": "vit_small_patch14_dinov2", "student.drop_path_rate": 0.1,
         "dino.n_prototypes": 16384}


def _case(name: str, experiment: str | None, device: str, **dotted: Any) -> dict[str, Any]:
    return {"name": name, "experiment": experiment, "device": device, "overrides": dotted}


def cases(cpu_only: bool) -> list[dict[str, Any]]:
    cpu = [
        _case("tiny 96-d/4 @56, self-distill", "tiny_cpu", "cpu", **{"train.batch_size": 16}),
        _case("tiny 96-d/4 @56, + ViT-Ti/16 expert", "tiny_cpu", "cpu",
              **{"train.batch_size": 16, "experts.models.tiny": TINY_EXPERT}),
        _case("ViT-S/14 @224, self-distill", None, "cpu", **VIT_S, **{"train.batch_size": 4}),
        _case("ViT-S/14 @224, + ViT-S/16 expert", None, "cpu",
              **VIT_S, **{"train.batch_size": 4, "experts.models.small": SMALL_EXPERT}),
    ]
    if cpu_only or not torch.cuda.is_available():
        return cpu
    gpu = [
        _case("ViT-L/14 @224, self-distill, bf16", None, "cuda", **{"train.batch_size": 64}),
        _case("ViT-L/14 @224, + ViT-L/16 expert, bf16", None, "cuda",
              **{"train.batch_size": 64, "experts.models.uni": UNI_SHAPED_EXPERT}),
    ]
    return cpu + gpu


def run_case(case: dict[str, Any], steps: int, workdir: Path) -> dict[str, Any]:
    overrides = {
        "data.slides": [str(SAMPLE_SLIDES)], "data.num_workers": 0, "train.device": case["device"],
        "train.steps": steps + WARMUP_STEPS, "train.resume": False, "train.progress": False,
        "train.precision": "bf16" if case["device"] == "cuda" else "fp32",
        "output.dir": str(workdir / "run"), **case["overrides"],
    }
    cfg = load_config(case["experiment"], nest_dotted(overrides))
    run = TrainingRun(cfg)
    loader = build_loader(cfg, run.source, run.meta.patch_size, run.layout, start_step=0)
    batches = itertools.repeat(next(iter(loader)))
    cuda = run.device.type == "cuda"
    for step in range(WARMUP_STEPS):
        run.train_step(step, batches)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for step in range(WARMUP_STEPS, WARMUP_STEPS + steps):
        losses = run.train_step(step, batches)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - tic) / steps
    return {
        "case": case["name"],
        "device": torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thr",
        "batch": run.layout.global_batch,
        "s/step": seconds,
        "images/s": run.layout.global_batch / seconds,
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "loss": losses["total"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case")
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()
    rows = []
    for case in cases(args.cpu_only):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_case(case, args.steps, Path(tmp)))
        print(f"done: {rows[-1]['case']} ({rows[-1]['images/s']:.3g} images/s)", flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
