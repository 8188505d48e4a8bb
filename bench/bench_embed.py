"""Benchmark the embed pipeline: model-only against end-to-end patches/s in each precision.

Measures, in one run, for each precision (fp32, fp16, bf16; ``--precisions``):

1. **model-only** patches/s: uint8 patches already in (pinned) host memory go through the very
   forward the pipeline runs (:class:`napari_gpfm.embeddings.pipeline.BatchForward`: uint8 copy
   to the device, normalisation there, the network under the precision's autocast, features
   back to the host), batch after batch, with the pipeline's batches in flight;
2. **end-to-end** patches/s: slide file → finished feature store through
   :func:`napari_gpfm.embeddings.embed_slide` (loader worker processes, the same batch size,
   precision and forward), steady state after the first batch, and wall time including tissue
   detection and start-up;
3. the ratio end-to-end / model-only (goal ≥ 0.9; on an H100/H200 also ≥ 2,500 patches/s for
   ViT-L/14 at 224, whose compute limit is ≈ 5,000).

Models (random weights, no download): ``--model vit-l`` is GPFM's network (timm
``vit_large_patch14_dinov2``, 224 px, LayerScale 1e-5): the GPU figure. ``--model tiny`` (a
2-block 48-d ViT at 56 px) and ``--model small`` (ViT-S/14 at 112 px) make a CPU run finish in
a minute. The slide is a synthetic tiled pyramid cut from the sample slide, sized for
``--patches`` patches, every patch embedded (no tissue step in the count).

``--memory`` adds the memory section: peak memory (main process + loader workers, PSS) while a
tiny model embeds a whole 100,000² px synthetic pyramid, sampled along the run (goal: flat,
< 3 GB).

Examples::

    python bench/bench_embed.py --model tiny --patches 256            # CPU, ~1 minute
    python bench/bench_embed.py --model vit-l --device cuda --patches 20000 --batch-size auto
    python bench/bench_embed.py --model small --memory                 # + the large-slide run
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # synthetic_slides

from napari_gpfm.embeddings import embed_slide  # noqa: E402
from napari_gpfm.embeddings.pipeline import BatchForward  # noqa: E402
from napari_gpfm.embeddings.run import cpu_threads_for, resolve_batch_size  # noqa: E402
from napari_gpfm.encoders.device import resolve_device, resolve_precision  # noqa: E402
from napari_gpfm.slide import open_slide  # noqa: E402
from napari_gpfm.tiles import PRESETS, GridSpec, TissueParams, make_grid  # noqa: E402


CARD = """\
name: {name}
display_name: benchmark {arch} at {size}px (random weights)
is_gpfm: false
architecture: {{timm_name: {arch}, kwargs: {{img_size: {size}, num_classes: 0{extra}}}}}
checkpoint_layout: timm
input:
  size: {size}
  interpolation: bicubic
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
embed_dim: {dim}
weights: {{file: null, env: null, default_path: null, hf_hub: null, url: null, sha256: null}}
license: Apache-2.0
gated: false
recommended_tiles: {{target_mpp: 0.5, patch_size: 224}}
provenance: {{}}
"""


def make_encoder(models_dir: Path, name: str, arch: str, size: int, device: str, extra: str = ""):
    """A random-weight encoder from a temporary model card."""
    import timm

    dim = timm.create_model(arch, img_size=size, num_classes=0, **_kw(extra)).num_features
    (models_dir / f"{name}.yaml").write_text(
        CARD.format(name=name, arch=arch, size=size, dim=dim, extra=extra)
    )
    os.environ["NAPARI_GPFM_MODELS_DIR"] = str(models_dir)
    from napari_gpfm.encoders import load_encoder

    return load_encoder(name, device=device, allow_random=True)


def _kw(extra: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in extra.split(","))):
        k, v = (s.strip() for s in part.split(":"))
        out[k] = float(v) if any(c in v for c in ".e") else int(v)
    return out


def _mem(proc: psutil.Process) -> int:
    """Proportional set size (shared pages split between processes), else RSS."""
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.Error, AttributeError):
        return int(proc.memory_info().rss)


class RssSampler:
    """Peak memory (PSS, so forked workers' shared pages count once) of this process plus its
    children, sampled in a thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                total = _mem(me)
                for child in me.children(recursive=True):
                    try:
                        total += _mem(child)
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


#: name -> (timm architecture, input size, extra timm kwargs as the card writes them)
MODELS = {
    "vit-l": ("vit_large_patch14_dinov2", 224, ", init_values: 1.0e-5"),
    "small": ("vit_small_patch14_dinov2", 112, ""),
    "tiny": ("vit_small_patch14_dinov2", 56, ", embed_dim: 48, depth: 2, num_heads: 2"),
}


def model_only_rate(forward: BatchForward, patches: torch.Tensor, batch_size: int,
                    device: torch.device, seconds: float) -> tuple[float, int]:
    """patches/s of ``forward`` over pre-loaded uint8 patches (pinned on CUDA), looping over
    them for at least ``seconds`` after one warm-up batch; returns (rate, patches timed)."""
    batches = [patches[i : i + batch_size] for i in range(0, len(patches), batch_size)]
    forward.submit(batches[0])  # warm-up (allocator, cuDNN/cuBLAS choice, compilation)
    forward.drain()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n, t = 0, time.perf_counter()
    while True:
        for b in batches:
            forward.submit(b)
            n += len(b)
        forward.drain()
        if time.perf_counter() - t >= seconds:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t), n


def end_to_end(encoder, slide_path: Path, out: Path, spec: GridSpec, batch_size: int,
               workers: int, device: str, precision: str, compile: bool) -> dict:
    """One embed_slide run (every patch, overwrite); wall-clock and steady-state rates."""
    t0 = time.perf_counter()
    records = []
    every = TissueParams(method="none")
    for rec in embed_slide(slide_path, encoder, spec, out, tissue_params=every,
                           batch_size=batch_size, num_workers=workers, device=device,
                           overwrite=True, precision=precision, compile=compile):
        records.append((time.perf_counter(), rec))
    wall = time.perf_counter() - t0
    running = [(t, r) for t, r in records if r.status == "running"]
    total = running[-1][1].done
    (t_first, r_first), (t_last, r_last) = running[0], running[-1]
    steady = (r_last.done - r_first.done) / (t_last - t_first) if len(running) > 1 else float("nan")
    return {"patches": total, "wall_s": wall, "overall": total / wall, "steady": steady,
            "first_batch_s": t_first - t0}


def synthetic_slide(path: Path, n_patches: int, input_size: int) -> tuple[Path, GridSpec]:
    """A pyramid of ``k × k ≥ n_patches`` patches of 224 px at 0.5 µm/px (mpp 0.499 level 0),
    and the spec that cuts them."""
    from synthetic_slides import make_large_pyramid

    k = max(2, int(np.ceil(np.sqrt(n_patches))))
    spec = GridSpec(target_mpp=0.5, patch_size=224, min_tissue=0.0, input_size=input_size)
    side0 = int(np.ceil(k * 224 * 0.5 / 0.499)) + 2
    return make_large_pyramid(path, side0, side0, min_side=min(1024, side0)), spec


def throughput_section(args, models_dir: Path, rows: list[list[str]], info: list[str]) -> None:
    dev = resolve_device(args.device)
    arch, size, extra = MODELS[args.model]
    encoder = make_encoder(models_dir, f"bench-{args.model}", arch, size, str(dev), extra)
    from napari_gpfm.tiles.loader import default_num_workers

    workers = default_num_workers(dev) if args.num_workers is None else args.num_workers
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads_for(workers))
    slide_path, spec = synthetic_slide(models_dir / "bench.tif", args.patches, size)
    slide = open_slide(slide_path)
    grid = make_grid(slide, spec, None, encoder_input=size)
    patches = torch.from_numpy(slide.read_patches(grid.coords, grid.patch_size_level0,
                                                  grid.out_size))  # fmt: skip
    if dev.type == "cuda":
        patches = patches.pin_memory()
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads"  # fmt: skip
    info += [f"device: {dev} ({where})",
             f"model: {arch} at {size} px, random weights, dim {encoder.embed_dim}"
             f"{', torch.compile' if args.compile else ''}",
             f"workload: {len(grid)} patches of a synthetic pyramid, {workers} loader workers, "
             f"{args.repeats} repeat(s), median"]  # fmt: skip
    for name in args.precisions:
        try:
            precision = resolve_precision(name, dev)
        except Exception as exc:  # e.g. bf16 on a GPU without it: say so in the table
            rows.append([name, "-", "-", "-", "-", f"not run: {exc}"])
            continue
        batch = resolve_batch_size(args.batch_size, encoder, dev, precision)
        forward = BatchForward(encoder, dev, precision, compiled=args.compile)
        model_rates, e2e = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):  # interleaved: load from elsewhere hits both alike
                model_rates.append(model_only_rate(forward, patches, batch, dev,
                                                   args.min_seconds)[0])  # fmt: skip
                e2e.append(end_to_end(encoder, slide_path, Path(tmp), spec, batch, workers,
                                      str(dev), precision, args.compile))  # fmt: skip
        model = float(np.median(model_rates))
        steady = float(np.median([r["steady"] for r in e2e]))
        overall = float(np.median([r["overall"] for r in e2e]))
        rows.append([precision, str(batch), f"{model:,.1f}", f"{steady:,.1f}",
                     f"{overall:,.1f}", f"**{steady / model:.2f}**"])  # fmt: skip


def rss_section(args, models_dir: Path, rows: list[tuple[str, str]]) -> None:
    from synthetic_slides import make_large_pyramid

    encoder = make_encoder(models_dir, "bench-tiny", "vit_small_patch14_dinov2", 56, "cpu",
                           extra=", embed_dim: 48, depth: 2, num_heads: 2")
    side = args.large_side
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = make_large_pyramid(Path(tmp) / "large.tif", side, side)
        t_make = time.perf_counter() - t
        base = _mem(psutil.Process())
        with RssSampler() as sampler:
            t = time.perf_counter()
            gen = embed_slide(path, encoder, PRESETS["gpfm-20x-224"], Path(tmp) / "out",
                              batch_size=64, num_workers=args.num_workers, device="cpu")
            batches, total, t_start, done = 0, 0, None, 0
            marks: dict[int, float] = {}  # percent of patches done -> peak memory so far (MiB)
            for rec in gen:
                if rec.status == "started":
                    t_start, total = time.perf_counter() - t, rec.total
                elif rec.status == "running":
                    batches, done = batches + 1, rec.done
                    for pct in (10, 50, 100):
                        if pct not in marks and done * 100 >= pct * total:
                            marks[pct] = sampler.peak / 2**20
                    if args.large_batches and batches >= args.large_batches:
                        break
            gen.close()
            t_run = time.perf_counter() - t
        children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows += [
        ("large slide", f"{side}×{side} px synthetic pyramid (written in {t_make:.1f} s), "
                        f"{total} tissue patches in the grid"),
        ("large slide: tissue + grid + store setup", f"{t_start:.1f} s"),
        ("large slide: patches embedded", f"{done} of {total} ({t_run:.1f} s, "
                                          f"{done / max(t_run, 1e-9):.0f} patches/s)"),
        ("peak memory after 10% / 50% / 100% of the patches",
         " / ".join(f"{marks[p]:.0f} MiB" if p in marks else "-" for p in (10, 50, 100))),
        ("peak memory main + workers (PSS)", f"{sampler.peak / 2**20:.0f} MiB "
                                             f"(main before the run {base / 2**20:.0f} MiB)"),
        ("peak RSS of the largest worker", f"{children_max:.0f} MiB"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="vit-l",
                   help="vit-l: GPFM's ViT-L/14 at 224 (the GPU figure); tiny/small: CPU runs")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precisions", default="fp32,fp16,bf16",
                   help="comma-separated precisions to measure (default: all three)")
    p.add_argument("--patches", type=int, default=2048,
                   help="patches in the synthetic slide (rounded up to a square grid)")
    p.add_argument("--batch-size", default="auto", help="N or auto (free GPU memory)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="loader workers (default: the embed default for the device)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="time model-only for at least this long (loops over the patches)")
    p.add_argument("--memory", action="store_true",
                   help="also run the memory section on a large synthetic pyramid")
    p.add_argument("--large-side", type=int, default=100_000)
    p.add_argument("--large-batches", type=int, default=0, help="stop after N batches (0: all)")
    args = p.parse_args(argv)
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if args.batch_size != "auto":
        args.batch_size = int(args.batch_size)
    rows: list[list[str]] = []
    info: list[str] = [f"load average before: {os.getloadavg()[0]:.2f}"]
    with tempfile.TemporaryDirectory() as models:
        models_dir = Path(models)
        if args.memory:  # first, so the baseline holds no benchmark arrays
            mem_rows: list[tuple[str, str]] = []
            if args.num_workers is None:
                from napari_gpfm.tiles.loader import default_num_workers

                args.num_workers = default_num_workers()
            rss_section(args, models_dir, mem_rows)
            print("| memory | value |\n|---|---|")
            for k, v in mem_rows:
                print(f"| {k} | {v} |")
            print()
        throughput_section(args, models_dir, rows, info)
    info.append(f"load average after: {os.getloadavg()[0]:.2f}")
    for line in info:
        print(f"- {line}")
    print()
    print("| precision | batch | model-only patches/s | end-to-end patches/s (steady) | "
          "end-to-end incl. start-up | end-to-end / model-only (goal ≥ 0.9) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
