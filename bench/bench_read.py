"""Patch reading and slide opening, against OpenSlide, tiffslide and fastslide in the same run.

    python bench/bench_read.py [--slide PATH] [--repeats 5] [--peers-python PYTHON]

Reads every 224 px patch of a grid over the slide (row-major, as embedding does) and the same
number of random patches, with each library, on the same coordinates. Our reader and
fastslide's tile cache start each run empty. OpenSlide and tiffslide run in this interpreter;
fastslide (not a dependency) runs in ``--peers-python`` (default ``/work/peers-venv/bin/python``,
skipped with a note when it lacks fastslide), one subprocess per round, reading the same
coordinates (its pixels are compared with ours first). Rounds alternate the order of the
readers; the table gives medians and the ratio to OpenSlide's rate from the same run, with the
load average. Then reads at 1.0 µm/px from a 0.5 µm/px pyramid (``--pyramid``, default the
real 4-level pyramid of the sample in ``../shared/data/wsi``): 224 px patches of a 1.0 µm/px
field (449 level-0 px at 0.499 µm/px) on a grid and at random, each library reading the level
its own rule picks (OpenSlide's ``get_best_level_for_downsample``, fastslide the same level,
napari-gpfm ``read_patch``) and resizing to 224 px where that level is not exactly 2x. Then
opens a 100,000 x 100,000 px synthetic pyramid (tiled from the real sample) and reports time and
memory. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from napari_gpfm._resources import sample_slide_path
from napari_gpfm.slide import open_slide, shared_tile_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_slides import make_large_pyramid  # noqa: E402 - tests/ is not a package

PATCH = 224
SHARED_PYRAMID = (Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi"
                  / "CMU-1-Small-Region.pyramid.tif")  # fmt: skip
DOWNSAMPLED_MPP = 1.0


def grid_coords(w: int, h: int) -> np.ndarray:
    ys, xs = np.mgrid[0 : h - PATCH + 1 : PATCH, 0 : w - PATCH + 1 : PATCH]
    return np.stack([xs.ravel(), ys.ravel()], 1)


def timed(fn) -> float:
    """Seconds of one run (our cache starts cold)."""
    shared_tile_cache().clear()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# fastslide in the peers' interpreter: argv = slide, coords .npz, patch; prints one JSON line
FASTSLIDE_WORKER = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import fastslide
slide_path, coords_path, patch = sys.argv[1], sys.argv[2], int(sys.argv[3])
level = int(sys.argv[4]) if len(sys.argv) > 4 else 0
side = int(sys.argv[5]) if len(sys.argv) > 5 else patch
data = np.load(coords_path)
sl = fastslide.FastSlide.from_file_path(slide_path)
check = data["check"]

def native(xy):  # fastslide takes the level's own coordinates
    if level == 0:
        return int(xy[0]), int(xy[1])
    return tuple(int(v) for v in sl.convert_level0_to_level_native(int(xy[0]), int(xy[1]), level))

pixels = sl.read_region(native(check), level, (side, side)).numpy()[..., :3]
out = {"check": pixels.tolist()}
if side != patch:
    from PIL import Image

def one(xy):
    region = sl.read_region(native(xy), level, (side, side)).numpy()
    if side != patch:
        region = np.asarray(Image.fromarray(region[..., :3]).resize((patch, patch), Image.BICUBIC))
    return region

for label in ("grid", "random"):
    coords = data[label]
    for threads in (1, 2):
        sl.set_cache(256 * 2**20)  # a fresh, empty LRU tile cache (256 MB) for each run
        t0 = time.perf_counter()
        if threads == 1:
            for xy in coords:
                one(xy)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, coords))
        out[f"{label}/{threads}"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def fastslide_python(python: str | None) -> str | None:
    """``python`` when it can import fastslide, else None (with a printed note)."""
    if not python or not Path(python).exists():
        print(f"note: fastslide skipped ({python or 'no --peers-python'} not found)")
        return None
    r = subprocess.run([python, "-c", "import fastslide"], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"note: fastslide skipped ({r.stderr.strip().splitlines()[-1]})")
        return None
    return python


def run_fastslide(peers: str, slide: Path, coords_file: Path, level: int = 0,
                  side: int = PATCH) -> dict:  # fmt: skip
    r = subprocess.run([peers, "-c", FASTSLIDE_WORKER, str(slide), str(coords_file), str(PATCH),
                        str(level), str(side)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=""))  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"fastslide worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def downsampled_reads(path: Path, repeats: int, peers: str | None) -> None:
    """224 px patches of a 1.0 µm/px field from a pyramid scanned at about 0.5 µm/px: each
    reader on its own best level, on the same grid and random coordinates, interleaved."""
    import openslide

    if not path.exists():
        print(f"\nnote: reads at {DOWNSAMPLED_MPP} µm/px skipped ({path} not found)")
        return
    slide = open_slide(path)
    mpp = slide.require_mpp()
    size0 = max(1, round(PATCH * DOWNSAMPLED_MPP / mpp))
    w, h = slide.dimensions
    ys, xs = np.mgrid[0 : h - size0 + 1 : size0, 0 : w - size0 + 1 : size0]
    grid = np.stack([xs.ravel(), ys.ravel()], 1)
    rng = np.random.default_rng(1)
    n_random = max(len(grid), 100)
    rand = np.stack([rng.integers(0, w - size0, n_random),
                     rng.integers(0, h - size0, n_random)], 1)  # fmt: skip
    counts = {"grid": len(grid), "random": n_random}
    osr = openslide.OpenSlide(str(path))
    level = osr.get_best_level_for_downsample(size0 / PATCH)
    side = max(1, round(size0 / osr.level_downsamples[level]))

    def openslide_one(x, y, osr=osr):
        region = osr.read_region((int(x), int(y)), level, (side, side)).convert("RGB")
        if side != PATCH:
            region = region.resize((PATCH, PATCH), Image.Resampling.BICUBIC)
        return np.asarray(region)

    def openslide_loop(coords):
        fresh = openslide.OpenSlide(str(path))  # its own tile cache starts empty, as ours
        for x, y in coords:
            openslide_one(x, y, fresh)
        fresh.close()

    def ours_loop(coords):
        for x, y in coords:
            slide.read_patch(int(x), int(y), size0, PATCH)

    def ours_threads(coords):
        slide.read_patches(coords, size0, PATCH, threads=2)

    x, y = grid[len(grid) // 2]
    ref = openslide_one(x, y)
    np.testing.assert_array_equal(slide.read_patch(int(x), int(y), size0, PATCH), ref)
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_read_ds_"))
    coords_file = tmpdir / "coords.npz"
    np.savez(coords_file, grid=grid, random=rand, check=np.array([x, y]))
    readers = [
        ("openslide-python read_region, 1 thread", openslide_loop),
        ("napari-gpfm read_patch, 1 thread", ours_loop),
        ("napari-gpfm read_patches, 2 threads", ours_threads),
    ]
    times: dict[tuple[str, str], list[float]] = {}
    same_pixels = None
    for rep in range(repeats):
        order = readers if rep % 2 == 0 else readers[::-1]
        if peers:
            order = [("fastslide", None), *order] if rep % 2 else [*order, ("fastslide", None)]
        for name, fn in order:
            if fn is None:
                out = run_fastslide(peers, path, coords_file, level, side)
                check = np.asarray(out["check"], np.int16)
                if side == PATCH:
                    d = np.abs(check - ref.astype(np.int16))
                    same_pixels = (int(d.max()), float(d.mean()))
                for label in ("grid", "random"):
                    for threads in (1, 2):
                        key = (label, f"fastslide read_region + tile cache, {threads} thread"
                                      f"{'s' if threads > 1 else ''}")  # fmt: skip
                        times.setdefault(key, []).append(out[f"{label}/{threads}"])
                continue
            for label, coords in (("grid", grid), ("random", rand)):
                times.setdefault((label, name), []).append(timed(lambda: fn(coords)))

    print(f"\nReads at {DOWNSAMPLED_MPP} µm/px from {path.name} ({w}x{h} at {mpp:g} µm/px, "
          f"{slide.level_count} levels): {len(grid)} grid and {n_random} random patches of "
          f"{PATCH} px = {size0} level-0 px, "
          f"read from level {level} (downsample {osr.level_downsamples[level]:.4f}, {side} px"
          f"{', resized' if side != PATCH else ', no resize'}); load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}, medians of {repeats} rounds\n")
    if same_pixels is not None:
        print(f"fastslide's pixels differ from ours (= OpenSlide's) by at most {same_pixels[0]} "
              f"grey levels (mean {same_pixels[1]:.2f}) on the check patch: it reads the level at "
              "whole level pixels, OpenSlide and napari-gpfm interpolate the fractional "
              "position\n")
    print("| reads at 1.0 µm/px | reader | patches/s | vs openslide |")
    print("|---|---|---:|---:|")
    for label in ("grid", "random"):
        base = statistics.median(times[(label, readers[0][0])])
        for (lab, name), ts in times.items():
            if lab == label:
                t = statistics.median(ts)
                print(f"| {label} | {name} | {counts[label] / t:,.0f} | {base / t:.2f}x |")
    slide.close()
    osr.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=sample_slide_path())
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians)")
    ap.add_argument("--peers-python", default="/work/peers-venv/bin/python",
                    help="interpreter with fastslide (skipped with a note when missing)")
    ap.add_argument("--pyramid", type=Path, default=SHARED_PYRAMID,
                    help="0.5 µm/px pyramid for the reads at 1.0 µm/px (skipped when missing)")
    ap.add_argument("--only-downsampled", action="store_true",
                    help="run only the reads at 1.0 µm/px")
    args = ap.parse_args()
    if args.only_downsampled:
        downsampled_reads(args.pyramid, args.repeats, fastslide_python(args.peers_python))
        return

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

    peers = fastslide_python(args.peers_python)
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_read_"))
    coords_file = tmpdir / "coords.npz"
    np.savez(coords_file, grid=grid, random=rand, check=np.array([x, y]))
    readers = [
        ("openslide-python read_region, 1 thread", openslide_loop),
        ("tiffslide read_region, 1 thread", tiffslide_loop),
        ("napari-gpfm read_patch, 1 thread", ours_loop),
        ("napari-gpfm read_patches, 2 threads", ours_threads),
    ]
    times: dict[tuple[str, str], list[float]] = {}
    same_pixels = None
    for rep in range(args.repeats):
        order = readers if rep % 2 == 0 else readers[::-1]
        if peers and rep % 2 == 1:  # the peer first in odd rounds, last in even ones
            order = [("fastslide", None), *order]
        elif peers:
            order = [*order, ("fastslide", None)]
        for name, fn in order:
            if fn is None:
                r = subprocess.run([peers, "-c", FASTSLIDE_WORKER, str(args.slide),
                                    str(coords_file), str(PATCH)], capture_output=True,
                                   text=True, env=dict(os.environ, PYTHONPATH=""))  # fmt: skip
                if r.returncode != 0:
                    raise SystemExit(f"fastslide worker failed:\n{r.stderr[-3000:]}")
                rep_out = json.loads(r.stdout.strip().splitlines()[-1])
                diff = np.abs(np.asarray(rep_out["check"], np.int16) - ref.astype(np.int16))
                same_pixels = int(diff.max())
                for label in ("grid", "random"):
                    for threads in (1, 2):
                        key = (label, f"fastslide read_region + tile cache, {threads} thread"
                                      f"{'s' if threads > 1 else ''}")  # fmt: skip
                        times.setdefault(key, []).append(rep_out[f"{label}/{threads}"])
                continue
            for label, coords in (("grid", grid), ("random", rand)):
                times.setdefault((label, name), []).append(timed(lambda: fn(coords)))

    rows = []
    for label in ("grid", "random"):
        base = statistics.median(times[(label, readers[0][0])])
        for (lab, name), ts in times.items():
            if lab == label:
                t = statistics.median(ts)
                rows.append((label, name, len(grid) / t, base / t))

    print(f"Slide: {args.slide.name} ({w}x{h}), {len(grid)} patches of {PATCH} px, "
          f"{psutil.cpu_count()} CPU cores, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}, medians of {args.repeats} "
          "interleaved rounds\n")
    if peers:
        print(f"fastslide's pixels differ from ours (= OpenSlide's) by at most {same_pixels} grey "
              "level(s) on the check patch (another JPEG decoder)\n")
    print("| reads | reader | patches/s | vs openslide |")
    print("|---|---|---:|---:|")
    for label, name, rate, ratio in rows:
        print(f"| {label} | {name} | {rate:,.0f} | {ratio:.2f}x |")

    downsampled_reads(args.pyramid, args.repeats, peers)

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
