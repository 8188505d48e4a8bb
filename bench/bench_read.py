"""Patch reading and slide opening, against OpenSlide and tiffslide in the same run.

    python bench/bench_read.py [--slide PATH] [--repeats 3]

Reads every 224 px patch of a grid over the slide (row-major, as embedding does) and the same
number of random patches, with each library, on the same coordinates. Our reader starts each
run with an empty tile cache. Then opens a 100,000 x 100,000 px synthetic pyramid (tiled from
the real sample) and reports time and memory. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from napari_gpfm._resources import sample_slide_path
from napari_gpfm.slide import open_slide, shared_tile_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_slides import make_large_pyramid  # noqa: E402 - tests/ is not a package

PATCH = 224


def grid_coords(w: int, h: int) -> np.ndarray:
    ys, xs = np.mgrid[0 : h - PATCH + 1 : PATCH, 0 : w - PATCH + 1 : PATCH]
    return np.stack([xs.ravel(), ys.ravel()], 1)


def timed(fn, repeats: int) -> float:
    """Best-of-``repeats`` seconds (each run starts cold for our cache)."""
    times = []
    for _ in range(repeats):
        shared_tile_cache().clear()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=sample_slide_path())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import openslide
    import tiffslide

    slide = open_slide(args.slide)
    w, h = slide.dimensions
    grid = grid_coords(w, h)
    rng = np.random.default_rng(0)
    rand = np.stack([rng.integers(0, w - PATCH, len(grid)), rng.integers(0, h - PATCH, len(grid))], 1)
    osr = openslide.OpenSlide(str(args.slide))
    tsl = tiffslide.TiffSlide(str(args.slide))

    def openslide_loop(coords):
        for x, y in coords:
            np.asarray(osr.read_region((int(x), int(y)), 0, (PATCH, PATCH)).convert("RGB"))

    def tiffslide_loop(coords):
        for x, y in coords:
            tsl.read_region((int(x), int(y)), 0, (PATCH, PATCH), as_array=True)

    def ours_loop(coords):
        for x, y in coords:
            slide.read_patch(int(x), int(y), PATCH, PATCH)

    def ours_threads(coords):
        slide.read_patches(coords, PATCH, PATCH, threads=2)

    # pixels agree before anything is timed
    x, y = grid[len(grid) // 2]
    ref = np.asarray(osr.read_region((int(x), int(y)), 0, (PATCH, PATCH)).convert("RGB"))
    assert np.array_equal(ref, slide.read_patch(int(x), int(y), PATCH, PATCH))

    rows = []
    for label, coords in (("grid", grid), ("random", rand)):
        base = timed(lambda: openslide_loop(coords), args.repeats)
        for name, fn in (
            ("openslide-python read_region (baseline)", openslide_loop),
            ("tiffslide read_region", tiffslide_loop),
            ("napari-gpfm read_patch, 1 thread", ours_loop),
            ("napari-gpfm read_patches, 2 threads", ours_threads),
        ):
            t = base if fn is openslide_loop else timed(lambda: fn(coords), args.repeats)
            rows.append((label, name, len(coords) / t, base / t))

    print(f"Slide: {args.slide.name} ({w}x{h}), {len(grid)} patches of {PATCH} px, "
          f"{psutil.cpu_count()} CPU cores, best of {args.repeats}\n")
    print("| reads | reader | patches/s | vs openslide |")
    print("|---|---|---:|---:|")
    for label, name, rate, ratio in rows:
        print(f"| {label} | {name} | {rate:,.0f} | {ratio:.2f}x |")

    with tempfile.TemporaryDirectory() as tmp:
        big = make_large_pyramid(Path(tmp) / "large.tif", 100_000, 100_000)
        proc = psutil.Process()
        opens = []
        for lib, fn in (
            ("napari-gpfm open_slide", lambda: open_slide(big)),
            ("openslide-python OpenSlide", lambda: openslide.OpenSlide(str(big))),
        ):
            rss0 = proc.memory_info().rss
            t0 = time.perf_counter()
            obj = fn()
            dt = time.perf_counter() - t0
            opens.append((lib, dt, (proc.memory_info().rss - rss0) / 2**20))
            del obj
        print("\nOpening a 100,000 x 100,000 px pyramid (7 levels, JPEG tiles):\n")
        print("| library | open time (s) | memory added (MB) |")
        print("|---|---:|---:|")
        for lib, dt, mb in opens:
            print(f"| {lib} | {dt:.3f} | {mb:.1f} |")


if __name__ == "__main__":
    main()
