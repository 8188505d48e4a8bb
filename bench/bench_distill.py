"""Training throughput of GPFM distillation: images/s per optimiser step, markdown table.

Each case builds the real training run (``TrainingRun``: student, EMA teacher, experts, losses,
AdamW with schedules) and times ``train_step`` on one pre-collated batch, so JPEG decoding and
augmentation are excluded. The batch comes from the bundled sample slide (real H&E patches).

CPU cases: a tiny student and a ViT-S/14 student, each with self-distillation only and with
one small random expert, and the ViT-S/14 with gradient checkpointing and with only its last 4
blocks trained. Each case runs in its own process, so "peak MiB" is that process's peak resident
memory (CPU) or ``torch.cuda.max_memory_allocated`` (GPU). With CUDA, the GPU cases: a ViT-L/14
student (GPFM recipe) with a ViT-L/14 expert (GPFM-shaped, random init) at batch 32, bf16
autocast: plain, with gradient checkpointing, and training the last 6 blocks.

Then an ESTIMATE (not a measurement) of the GPU memory of continued GPFM pretraining (ViT-L/14
student + EMA teacher + frozen ViT-L/14 expert, batch 32, 2 global 224 px + 8 local 98 px crops,
bf16 autocast, AdamW): parameters and optimizer states from the real parameter counts (models
built on the meta device), activations from Korthikanti et al. 2022 ("Reducing activation
recomputation in large transformer models", eq. 2 without the s² term, which fused attention
does not store) at 34·s·h bytes per block per image, plus 4·s·h for LayerScale and drop path,
and the prototype logits of the DINO/iBOT losses.

    python bench/bench_distill.py [--steps 3] [--cpu-only] [--estimate-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
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
GPFM_SHAPED_EXPERT = {
    "timm": {"name": "vit_large_patch14_dinov2", "kwargs": {"img_size": 224,
                                                             "init_values": 1.0e-5}},
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
        _case("ViT-S/14 @224, self-distill, grad checkpointing", None, "cpu",
              **VIT_S, **{"train.batch_size": 4, "student.grad_checkpointing": True}),
        _case("ViT-S/14 @224, self-distill, last 4 blocks", None, "cpu",
              **VIT_S, **{"train.batch_size": 4, "student.trainable_blocks": 4}),
    ]
    if cpu_only or not torch.cuda.is_available():
        return cpu
    gpfm = {"train.batch_size": 32, "experts.models.gpfm": GPFM_SHAPED_EXPERT}
    gpu = [
        _case("ViT-L/14 + ViT-L/14 expert, bf16", None, "cuda", **gpfm),
        _case("ViT-L/14 + ViT-L/14 expert, bf16, grad checkpointing", None, "cuda",
              **gpfm, **{"student.grad_checkpointing": True}),
        _case("ViT-L/14 + ViT-L/14 expert, bf16, last 6 blocks", None, "cuda",
              **gpfm, **{"student.trainable_blocks": 6}),
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
        "peak MiB": (torch.cuda.max_memory_allocated() / 2**20 if cuda
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "loss": losses["total"],
    }


def run_isolated(index: int, cpu_only: bool, steps: int, threads: int | None = None
                 ) -> dict[str, Any]:
    """One case in a fresh process (its own peak memory)."""
    done = subprocess.run(
        [sys.executable, __file__, "--one", str(index), "--steps", str(steps)]
        + (["--cpu-only"] if cpu_only else []) + (["--threads", str(threads)] if threads else []),
        capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"case {index} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- ESTIMATE of ViT-L memory ---------------------------------------------------------------------
GB = 1e9


def _params(arch: str, **kwargs: Any) -> int:
    import timm

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    return sum(p.numel() for p in model.parameters())


def _block_params(arch: str, **kwargs: Any) -> tuple[int, int]:
    import timm

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    return sum(p.numel() for p in model.blocks[0].parameters()), len(model.blocks)


def estimate_vitl(batch: int = 32, local: int = 8, checkpointing: bool = False,
                  trainable_blocks: int | None = None) -> dict[str, float]:
    """GB of continued GPFM pretraining on one GPU (see the module docstring). An ESTIMATE."""
    arch, kw = "vit_large_patch14_dinov2", {"img_size": 224, "init_values": 1e-5}
    backbone = _params(arch, **kw)
    per_block, depth = _block_params(arch, **kw)
    h, k = 1024, 65536
    dino_head = h * 2048 + 2048 * 2048 + 2048 * 256 + 256 * k + 2 * 2048 + 256
    expert_head = h * 256 + 256 + 256 * h + h
    trained_backbone = backbone if trainable_blocks is None else trainable_blocks * per_block
    n_trained = trained_backbone + dino_head + expert_head
    weights = 4 * (backbone + dino_head + expert_head)          # student fp32
    train_state = 12 * n_trained                                # grads + AdamW (m, v), fp32
    teacher = 4 * (backbone + dino_head)                        # EMA teacher fp32
    expert = 4 * backbone                                       # frozen GPFM-shaped expert fp32
    s_global, s_local = (224 // 14) ** 2 + 1, (98 // 14) ** 2 + 1
    per_block_act = lambda s: (34 + 4) * s * h  # noqa: E731 - bytes per block per image
    images_g, images_l = 2 * batch, local * batch
    blocks = depth if trainable_blocks is None else trainable_blocks
    full = blocks * (images_g * per_block_act(s_global) + images_l * per_block_act(s_local))
    if checkpointing:  # block inputs (bf16) kept, one block recomputed at a time
        kept = blocks * 2 * h * (images_g * s_global + images_l * s_local)
        activations = kept + images_g * per_block_act(s_global)
    else:
        activations = full
    masked = int(images_g * 0.5 * 0.3 * (s_global - 1))       # iBOT rows: half the crops, ~30 %
    rows = images_g + images_l + masked
    logits = rows * k * (2 + 4 + 4) + images_g * 0.5 * 0.3 * (s_global - 1) * k * 4
    total = weights + train_state + teacher + expert + activations + logits
    return {"weights+grads+AdamW": (weights + train_state) / GB, "teacher": teacher / GB,
            "expert": expert / GB, "activations": activations / GB,
            "prototype logits": logits / GB, "total": total / GB}


def estimate_table() -> str:
    rows = []
    for name, kwargs in [("plain", {}), ("grad checkpointing", {"checkpointing": True}),
                         ("last 6 blocks", {"trainable_blocks": 6}),
                         ("last 6 blocks + checkpointing",
                          {"trainable_blocks": 6, "checkpointing": True}),
                         ("batch 16 (x2 accumulation) + checkpointing",
                          {"batch": 16, "checkpointing": True})]:
        rows.append({"ViT-L/14 continued GPFM, ESTIMATE": name,
                     **{k: round(v, 1) for k, v in estimate_vitl(**kwargs).items()}})
    return markdown(rows)


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
    parser.add_argument("--estimate-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per case (1 avoids OpenMP spinning on a "
                             "loaded machine)")
    parser.add_argument("--only", default=None, help="run the cases whose name holds this")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_case(cases(args.cpu_only)[args.one], args.steps, Path(tmp))))
        return
    if not args.estimate_only:
        rows = []
        for index, case in enumerate(cases(args.cpu_only)):
            if args.only and args.only not in case["name"]:
                continue
            rows.append(run_isolated(index, args.cpu_only, args.steps, args.threads))
            print(f"done: {rows[-1]['case']} ({rows[-1]['images/s']:.3g} images/s)", flush=True)
        print(markdown(rows))
    print()
    print(estimate_table())


if __name__ == "__main__":
    main()
