"""Benchmark the embed pipeline: does patch loading keep the model fed, and is memory bounded?

Measures, in one run:

1. **CPU throughput.** End-to-end patches/s (slide file → finished feature store, through
   ``napari_gpfm.embeddings.embed_slide`` with loader worker processes) against model-only
   patches/s (the same encoder, ``preprocess`` + ``embed`` on the same patches pre-loaded in
   memory, same batch size and threads). Goal: steady-state ratio ≥ 0.9.
2. **Peak memory** (main process + loader workers, PSS) while embedding a whole large synthetic
   pyramid (``tests/synthetic_slides.make_large_pyramid``, 100,000² px, tens of thousands
   of tissue patches) with a tiny model, sampled along the run: it must stay flat as patches
   accumulate (goal: peak < 3 GB). ``--large-batches N`` stops after N batches instead.
3. **GPU** (only when CUDA is available): the same comparison with autocast.

Random weights (no download). Prints a markdown table. Example::

    python bench/bench_embed.py                  # ViT-S/14 at 112 px, 4096² synthetic slide
    python bench/bench_embed.py --img-size 224 --slide sample_data/CMU-1-Small-Region.svs
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
from napari_gpfm.embeddings.run import cpu_threads_for  # noqa: E402
from napari_gpfm.encoders.device import autocast, precision_name  # noqa: E402
from napari_gpfm.slide import open_slide  # noqa: E402
from napari_gpfm.tiles import PRESETS, TissueParams, detect_tissue, make_grid  # noqa: E402


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
        out[k] = int(v)
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


def model_only_rate(encoder, patches: np.ndarray, batch_size: int, device: torch.device,
                    repeats: int = 1) -> float:
    """patches/s of preprocess + embed on pre-loaded uint8 patches."""
    x = torch.from_numpy(patches)
    with torch.inference_mode():  # warm-up
        with autocast(device):
            encoder.embed(encoder.preprocess(x[:batch_size].to(device)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for i in range(0, len(x), batch_size):
            with torch.inference_mode():
                xb = encoder.preprocess(x[i : i + batch_size].to(device, non_blocking=True))
                with autocast(device):
                    f = encoder.embed(xb)
                f.float().cpu()
            n += min(batch_size, len(x) - i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def end_to_end(encoder, slide_path: Path, out: Path, batch_size: int, workers: int,
               device: str, tissue: TissueParams) -> dict:
    """Run embed_slide once; wall-clock and steady-state (after the first batch) rates."""
    t0 = time.perf_counter()
    records = []
    for rec in embed_slide(slide_path, encoder, PRESETS["gpfm-20x-224"], out,
                           tissue_params=tissue, batch_size=batch_size, num_workers=workers,
                           device=device, overwrite=True):
        records.append((time.perf_counter(), rec))
    wall = time.perf_counter() - t0
    running = [(t, r) for t, r in records if r.status == "running"]
    total = running[-1][1].done
    (t_first, r_first), (t_last, r_last) = running[0], running[-1]
    steady = (r_last.done - r_first.done) / (t_last - t_first) if len(running) > 1 else float("nan")
    return {"patches": total, "wall_s": wall, "overall": total / wall, "steady": steady,
            "first_batch_s": t_first - t0}


def throughput_section(args, slide_path: Path, device: str, batch_size: int, workers: int,
                       models_dir: Path, rows: list[tuple[str, str]]) -> None:
    dev = torch.device(device)
    encoder = make_encoder(models_dir, f"bench-{device}", args.arch, args.img_size, device)
    tissue = TissueParams(thumbnail_max_side=1024)
    threads = cpu_threads_for(workers) if dev.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)

    slide = open_slide(slide_path)
    grid = make_grid(slide, PRESETS["gpfm-20x-224"], detect_tissue(slide, tissue),
                     encoder_input=args.img_size)
    patches = slide.read_patches(grid.coords, grid.patch_size_level0, grid.out_size)

    with tempfile.TemporaryDirectory() as tmp:
        # Interleave so that load from other processes on the machine hits both alike.
        model_rates, e2e = [], []
        for _ in range(args.repeats):
            model_rates.append(model_only_rate(encoder, patches, batch_size, dev))
            e2e.append(end_to_end(encoder, slide_path, Path(tmp), batch_size, workers, device,
                                  tissue))
    model = float(np.median(model_rates))
    steady = float(np.median([r["steady"] for r in e2e]))
    overall = float(np.median([r["overall"] for r in e2e]))
    first = float(np.median([r["first_batch_s"] for r in e2e]))
    tag = "GPU" if dev.type == "cuda" else "CPU"
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{threads} torch threads"
    rows += [
        (f"{tag} device", f"{device} ({where}), precision {precision_name(dev)}"),
        (f"{tag} model", f"{args.arch} @ {args.img_size}px, random weights, "
                         f"dim {encoder.embed_dim}"),
        (f"{tag} workload", f"{Path(slide_path).name}: {e2e[0]['patches']} patches, batch "
                            f"{batch_size}, {workers} loader workers, {args.repeats} repeats "
                            "(median)"),
        (f"{tag} model-only patches/s", f"{model:.1f}"),
        (f"{tag} end-to-end patches/s (steady, after 1st batch)", f"{steady:.1f}"),
        (f"{tag} end-to-end patches/s (wall, incl. tissue + startup)",
         f"{overall:.1f} (first batch after {first:.2f} s)"),
        (f"{tag} ratio steady / model-only (goal ≥ 0.9)", f"**{steady / model:.2f}**"),
        (f"{tag} ratio wall / model-only", f"{overall / model:.2f}"),
    ]


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slide", type=Path, default=None,
                   help="slide for the CPU section (default: a synthetic pyramid of --cpu-side, "
                        "else the sample slide)")
    p.add_argument("--cpu-side", type=int, default=4096)
    p.add_argument("--arch", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=112,
                   help="model input; 112 makes the model ~5x cheaper than at 224, so loading "
                        "weighs more: a stricter test of the loader")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gpu-batch-size", type=int, default=256)
    p.add_argument("--gpu-side", type=int, default=16_000,
                   help="side of the synthetic slide used for the GPU section")
    p.add_argument("--num-workers", type=int, default=None,
                   help="loader workers (default: the embed default, min(2, CPUs))")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--large-side", type=int, default=100_000)
    p.add_argument("--large-batches", type=int, default=0, help="stop after N batches (0: all)")
    p.add_argument("--skip-large", action="store_true")
    args = p.parse_args()
    from napari_gpfm.tiles.loader import default_num_workers

    workers = default_num_workers() if args.num_workers is None else args.num_workers
    args.num_workers = workers
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as models:
        models_dir = Path(models)
        if not args.skip_large:  # first, so the baseline holds no benchmark arrays
            rss_section(args, models_dir, rows)
        cpu_slide = args.slide
        if cpu_slide is None:
            from synthetic_slides import make_large_pyramid

            cpu_slide = make_large_pyramid(models_dir / "cpu.tif", args.cpu_side, args.cpu_side)
        throughput_section(args, cpu_slide, "cpu", args.batch_size, workers, models_dir, rows)
        if torch.cuda.is_available():
            gpu_workers = max(workers, min(8, (os.cpu_count() or 2) - 1))
            from synthetic_slides import make_large_pyramid

            gpu_slide = make_large_pyramid(models_dir / "gpu.tif", args.gpu_side, args.gpu_side)
            throughput_section(args, gpu_slide, "cuda", args.gpu_batch_size, gpu_workers,
                               models_dir, rows)
        else:
            rows.append(("GPU", "no CUDA device: section skipped"))
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
