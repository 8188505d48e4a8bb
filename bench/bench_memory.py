"""Peak memory of the thumbnail and tissue detection on a pyramid whose smallest level is large.

A 2-level 100,000 x 100,000 px pyramid (100k + 50k, tiled JPEG, written in about a second by
``tests/synthetic_slides.make_large_pyramid`` from the bundled sample's tissue) is opened in
a fresh subprocess, which builds the thumbnail (``Slide.thumbnail_with_downsample(2048)``) and the
tissue mask (``detect_tissue``); the parent samples the child's RSS with psutil every 20 ms and
the child reports its own peak (``VmHWM``; ``ru_maxrss`` would count the parent's at the fork).
Before the fix the thumbnail asked for the whole 50k² level (7.5 GB) and failed with
``MemoryError``; the target is a peak under 1 GB.

    python bench/bench_memory.py                   # 100k², 2 levels (the issue's case)
    python bench/bench_memory.py --side 40000      # the 40k² case (40k + 20k)
    python bench/bench_memory.py --levels 1        # no pyramid at all (virtual levels only)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # synthetic_slides

LIMIT_BYTES = 2**30  # the bound: 1 GB

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()

def hwm():
    # this process's own peak RSS (Linux VmHWM; ru_maxrss can include the forking parent's)
    try:
        line = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
        return int(line.split()[1]) * 1024
    except (OSError, IndexError):
        return None

from napari_gpfm.slide import open_slide
from napari_gpfm.tiles import TissueParams, detect_tissue

slide = open_slide(sys.argv[1])
t_open = time.perf_counter()
thumb, ds = slide.thumbnail_with_downsample(2048)
t_thumb = time.perf_counter()
mask = detect_tissue(slide, TissueParams())
t_tissue = time.perf_counter()
print(json.dumps({
    "levels": slide.level_dimensions,
    "stored_levels": len(slide.backend.levels),
    "thumbnail": list(thumb.shape), "downsample": ds,
    "tissue_fraction": float(mask.mask.mean()),
    "open_s": t_open - t0, "thumbnail_s": t_thumb - t_open, "tissue_s": t_tissue - t_thumb,
    "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "vm_hwm": hwm(),
}))
"""


def measure(path: Path) -> dict:
    """Run the child on ``path``; its report plus the peak RSS the parent saw."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    child = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child failed (exit {proc.returncode}):\n{err[-4000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    report["sampled_peak_rss"] = peak
    own = report["vm_hwm"] if report["vm_hwm"] is not None else report["ru_maxrss"]
    report["own_peak_rss"] = own
    report["peak_rss"] = max(peak, own)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=100_000, help="level-0 side in px")
    ap.add_argument("--levels", type=int, default=2, help="stored levels (1: no pyramid)")
    ap.add_argument("--keep", type=Path, default=None, help="write the pyramid here, keep it")
    args = ap.parse_args()

    from synthetic_slides import make_large_pyramid

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / f"pyramid_{args.side}_{args.levels}.tif"
        # levels halve down to min_side: the smallest stored level is side / 2**(levels-1)
        min_side = args.side >> (args.levels - 1) if args.levels > 1 else 10**12
        t = time.perf_counter()
        make_large_pyramid(path, args.side, args.side, min_side=min_side)
        written = time.perf_counter() - t
        r = measure(path)

    gib = 2**30
    stored = r["levels"][: r["stored_levels"]]
    print(f"| pyramid | {args.side:,}² px, {r['stored_levels']} stored level(s) "
          f"{' + '.join(f'{w:,}' for w, _ in stored)}; {len(r['levels']) - r['stored_levels']} "
          f"virtual down to {r['levels'][-1][0]:,} (written in {written:.1f} s) |")
    print("|---|---|")
    print(f"| thumbnail 2048 | {r['thumbnail'][1]}×{r['thumbnail'][0]} (downsample "
          f"{r['downsample']:.2f}) in {r['thumbnail_s']:.1f} s |")
    print(f"| tissue detection | {r['tissue_s']:.1f} s (tissue {100 * r['tissue_fraction']:.0f} % "
          "of the thumbnail) |")
    print(f"| peak RSS (open + thumbnail + tissue) | **{r['peak_rss'] / gib:.2f} GiB** "
          f"({r['peak_rss'] / 2**20:,.0f} MiB; psutil sampled {r['sampled_peak_rss'] / 2**20:,.0f}"
          f" MiB, the child's own peak {r['own_peak_rss'] / 2**20:,.0f} MiB) |")
    ok = r["peak_rss"] < LIMIT_BYTES
    print(f"\npeak {'under' if ok else 'OVER'} 1 GiB")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
