"""Tissue detection + patch grid: napari-gpfm against hs2p, on the same slides, in one run.

    python bench/bench_tissue.py [--repeats 5] [--peers-python /work/peers-venv/bin/python]
                                 [--slide PATH ...] [--no-large]

Inputs: (a) the bundled sample slide (real H&E, one level, 2220 x 2967 px), (b) its real
4-level pyramid from ``../shared/data/wsi`` and any ``--slide`` given, (c) the generated
100,000 x 100,000 px pyramid (7 levels, tiled from the sample). Every tool cuts 224 px patches
at 0.5 µm/px, no overlap, and keeps a patch when at least half of it is tissue, each with its
own default tissue detection (napari-gpfm: ``TissueParams()``, method "auto"; hs2p: its
shipped ``hsv`` segmentation at downsample 64, ``close=4``, ``a_t=4``, ``a_h=2``).

Each measurement is a fresh subprocess (napari-gpfm in this interpreter, hs2p in the peers'
interpreter, which must have ``hs2p`` and ``openslide-python`` + ``openslide-bin``): it imports
the tool's public API (not timed, reported), then times "open the slide, detect tissue, lay the
grid" once as the first call of the process (lazy imports inside the tool count) and then
``--calls`` more times (a batch of slides: the median is the "steady" figure). Our tile cache
is cleared before each call, and the peers reopen the slide on each call, so no call reuses a
thumbnail; the process pauses half a second after its first call (the BLAS thread pools that
numpy, scipy and OpenCV start on import spin for tens of ms and would be counted in the steady
calls' CPU time). Tools run interleaved (A B, B A, ...) ``--repeats`` times; the table gives
medians and the ratio to napari-gpfm from the same run, with the machine's load average. The steady
calls' CPU time (``time.process_time``, all threads of the process) is given too: on a
loaded machine it says more than wall time about what each tool costs.

Agreement: on (a) and (b) each tool's kept patches are rasterised at level 0 and compared with
the hand-traced tissue of the sample (``tests/tiles/tiles_helpers.SAMPLE_HAND_TISSUE``):
precision (share of the patches' area that is tissue), recall (share of the tissue covered by
patches) and Dice; and each tool's tissue mask (upsampled to level 0) by its IoU with it.
hs2p lays one grid per tissue contour (origins at each contour's bounding box) where
napari-gpfm lays one slide-wide grid, so patch Dice also measures that choice. The generated
pyramid has no hand mask (its lower levels are tiled from the sample at their own scale, so
they are not downsamples of level 0): there each tool's patches are compared with
napari-gpfm's (Dice of the covered areas, rasterised at 1/16).

Peers not installed are skipped with a printed note; nothing here is a test (no asserts on
times).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PATCH, TARGET_MPP, MIN_TISSUE = 224, 0.5, 0.5

# ----------------------------------------------------------------------------- workers
# Each worker is a small program run with ``python -c``: it prints one JSON line and writes the
# kept patches' level-0 top-left corners to an .npy file.
WORKER_COMMON = r"""
import json, statistics, sys, time
import numpy as np
slide_path, out_path, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
PATCH, TARGET_MPP, MIN_TISSUE = 224, 0.5, 0.5
# After the first call, before the steady ones: the BLAS thread pools that numpy, scipy and
# OpenCV start on import spin for tens of ms of CPU (not the tool's work, but counted by
# process_time): they settle first, for every tool alike.
SETTLE_S = 0.5
"""

WORKER_OURS = WORKER_COMMON + r"""
t0 = time.perf_counter()
from napari_gpfm.slide import open_slide, shared_tile_cache
from napari_gpfm.tiles import GridSpec, TissueParams, detect_tissue, make_grid
import_s = time.perf_counter() - t0

def run():
    shared_tile_cache().clear()
    t, c = time.perf_counter(), time.process_time()
    slide = open_slide(slide_path)
    tissue = detect_tissue(slide, TissueParams())
    grid = make_grid(slide, GridSpec(target_mpp=TARGET_MPP, patch_size=PATCH, overlap=0,
                                     min_tissue=MIN_TISSUE), tissue)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    slide.close()
    return dt, grid, dc

first, grid, _ = run()
time.sleep(SETTLE_S)
again = [run() for _ in range(calls)]
steady, steady_cpu = [r[0] for r in again], [r[2] for r in again]
tm = detect_tissue(open_slide(slide_path), TissueParams())
np.save(out_path, grid.coords)
np.save(out_path + ".mask.npy", tm.mask)
print(json.dumps({"import_s": import_s, "first_s": first, "steady_s": steady,
                  "steady_cpu_s": steady_cpu, "tiles": len(grid),
                  "size0": int(grid.patch_size_level0), "how": tm.how}))
"""

WORKER_HS2P = WORKER_COMMON + r"""
from pathlib import Path
t0 = time.perf_counter()
from hs2p.api import (FilterConfig, MaskSamplingConfig, SegmentationConfig, SlideSpec,
                      TilingConfig, tile_slide)
import_s = time.perf_counter() - t0
masks = MaskSamplingConfig(pixel_mapping={"background": 0, "tissue": 1},
                           min_coverage={"tissue": MIN_TISSUE})
tiling = TilingConfig(requested_spacing_um=TARGET_MPP, requested_tile_size_px=PATCH,
                      tolerance=0.05, overlap=0.0, backend="openslide")

def run():
    t, c = time.perf_counter(), time.process_time()
    r = tile_slide(SlideSpec(sample_id="s", image_path=Path(slide_path)), tiling=tiling,
                   segmentation=SegmentationConfig(method="hsv"), filtering=FilterConfig(),
                   num_workers=1, masks=masks)
    return time.perf_counter() - t, r, time.process_time() - c

first, r, _ = run()
time.sleep(SETTLE_S)
again = [run() for _ in range(calls)]
steady, steady_cpu = [a[0] for a in again], [a[2] for a in again]
coords = np.stack([np.asarray(r.tiles.x), np.asarray(r.tiles.y)], 1).astype(np.int64)
np.save(out_path, coords)
np.save(out_path + ".mask.npy", np.asarray(r.tiles.tissue_mask) > 0)
print(json.dumps({"import_s": import_s, "first_s": first, "steady_s": steady,
                  "steady_cpu_s": steady_cpu, "tiles": int(len(coords)),
                  "size0": int(r.tiles.tile_size_lv0),
                  "how": f"hsv, seg level {r.seg_level} (downsample {r.seg_downsample})"}))
"""

TOOLS = {"napari-gpfm": WORKER_OURS, "hs2p": WORKER_HS2P}


def peer_available(python: str | None, module: str) -> str | None:
    """None when ``module`` imports under ``python``, else why not."""
    if not python:
        return "no --peers-python given"
    if not Path(python).exists():
        return f"{python} not found"
    r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    return None if r.returncode == 0 else r.stderr.strip().splitlines()[-1]


def run_worker(python: str, code: str, slide: Path, out: Path, calls: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) if python == sys.executable else "")
    r = subprocess.run([python, "-c", code, str(slide), str(out), str(calls)], cwd=REPO,
                       capture_output=True, text=True, env=env)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"worker failed on {slide}:\n{r.stderr[-3000:]}")
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    rep["coords"] = np.load(out)
    rep["mask"] = np.load(str(out) + ".mask.npy")
    return rep


# ----------------------------------------------------------------------------- agreement
def hand_mask() -> np.ndarray:
    sys.path.insert(0, str(REPO / "tests" / "tiles"))
    from tiles_helpers import sample_hand_mask

    return sample_hand_mask()


def covered(coords: np.ndarray, size0: int, shape: tuple[int, int], ds: int = 1) -> np.ndarray:
    """Union of the patches ``[x, x+size0) x [y, y+size0)`` on a (h, w) grid of ``ds`` px."""
    h, w = shape
    diff = np.zeros((h + 1, w + 1), np.int32)
    x0 = np.clip(coords[:, 0] // ds, 0, w)
    y0 = np.clip(coords[:, 1] // ds, 0, h)
    x1 = np.clip(-(-(coords[:, 0] + size0) // ds), 0, w)
    y1 = np.clip(-(-(coords[:, 1] + size0) // ds), 0, h)
    np.add.at(diff, (y0, x0), 1)
    np.add.at(diff, (y0, x1), -1)
    np.add.at(diff, (y1, x0), -1)
    np.add.at(diff, (y1, x1), 1)
    return diff.cumsum(0).cumsum(1)[:h, :w] > 0


def mask_iou(mask: np.ndarray, truth: np.ndarray) -> float:
    """IoU of a tissue mask (any resolution covering the slide) with the level-0 ``truth``,
    the mask upsampled by nearest neighbour."""
    h, w = truth.shape
    ys = np.minimum((np.arange(h) * mask.shape[0] / h).astype(int), mask.shape[0] - 1)
    xs = np.minimum((np.arange(w) * mask.shape[1] / w).astype(int), mask.shape[1] - 1)
    m0 = mask[np.ix_(ys, xs)]
    return float((m0 & truth).sum() / max(1, (m0 | truth).sum()))


def agreement(cov: np.ndarray, truth: np.ndarray) -> dict:
    tp = float((cov & truth).sum())
    return {"precision": tp / max(1.0, float(cov.sum())),
            "recall": tp / max(1.0, float(truth.sum())),
            "dice": 2 * tp / max(1.0, float(cov.sum() + truth.sum()))}  # fmt: skip


# ----------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per input")
    ap.add_argument("--calls", type=int, default=3, help="steady-state calls per process")
    ap.add_argument("--peers-python", default="/work/peers-venv/bin/python",
                    help="interpreter with hs2p installed (skipped with a note when missing)")
    ap.add_argument("--slide", type=Path, action="append", default=[],
                    help="another real slide to add to (b)")
    ap.add_argument("--no-large", action="store_true", help="skip the 100,000² pyramid")
    ap.add_argument("--inputs", default="abc",
                    help="which inputs to run, as letters: a (sample SVS), b (real pyramid and "
                         "--slide), c (100,000² pyramid); default abc")  # fmt: skip
    args = ap.parse_args()

    from napari_gpfm._resources import sample_slide_path

    tools = {"napari-gpfm": sys.executable}
    missing = peer_available(args.peers_python, "hs2p.api")
    if missing:
        print(f"note: hs2p skipped ({missing})")
    else:
        tools["hs2p"] = args.peers_python

    inputs: list[tuple[str, Path, bool]] = []
    if "a" in args.inputs:
        inputs.append(("(a) sample SVS", Path(sample_slide_path()), True))
    pyr = SHARED / "wsi" / "CMU-1-Small-Region.pyramid.tif"
    if "b" in args.inputs and pyr.exists():
        inputs.append(("(b) real 4-level pyramid", pyr, True))
    elif "b" in args.inputs:
        print(f"note: {pyr} not found, (b) skipped")
    if "b" in args.inputs:
        inputs += [(f"(b) {p.name}", p, False) for p in args.slide]

    tmp = Path(tempfile.mkdtemp(prefix="bench_tissue_"))
    if not args.no_large and "c" in args.inputs:
        sys.path.insert(0, str(REPO / "tests"))
        from synthetic_slides import make_large_pyramid  # tests/ is not a package

        inputs.append(("(c) generated 100,000² pyramid",
                       make_large_pyramid(tmp / "large.tif", 100_000, 100_000), False))

    hand = hand_mask()
    rows = []
    for label, path, has_hand in inputs:
        names = list(tools)
        results: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeats):
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                out = tmp / f"{name}.npy"
                results[name].append(run_worker(tools[name], TOOLS[name], path, out, args.calls))
        ours = results["napari-gpfm"]
        ref_first = statistics.median(r["first_s"] for r in ours)
        ref_steady = statistics.median(s for r in ours for s in r["steady_s"])
        ref_cpu = statistics.median(s for r in ours for s in r["steady_cpu_s"])
        ref_cov = None
        for name in names:
            rs = results[name]
            first = statistics.median(r["first_s"] for r in rs)
            steady = statistics.median(s for r in rs for s in r["steady_s"])
            cpu = statistics.median(s for r in rs for s in r["steady_cpu_s"])
            last = rs[-1]
            if has_hand:
                cov = covered(last["coords"], last["size0"], hand.shape)
                agree = agreement(cov, hand)
                agree_txt = (f"patches P {agree['precision']:.3f} / R {agree['recall']:.3f} / "
                             f"Dice {agree['dice']:.3f}; mask IoU "
                             f"{mask_iou(last['mask'], hand):.3f} "
                             f"({last['mask'].shape[1]}x{last['mask'].shape[0]})")  # fmt: skip
            else:
                from napari_gpfm.slide import open_slide

                s = open_slide(path)
                w, h = s.dimensions
                s.close()
                cov = covered(last["coords"], last["size0"], (-(-h // 16), -(-w // 16)), 16)
                if ref_cov is None:
                    ref_cov = cov
                    agree_txt = "reference"
                else:
                    d = agreement(cov, ref_cov)["dice"]
                    agree_txt = f"Dice vs napari-gpfm {d:.3f}"
            cold = statistics.median(r["import_s"] + r["first_s"] for r in rs)
            rows.append((label, name, first, steady, first / ref_first, steady / ref_steady,
                         cpu, cpu / ref_cpu, last["tiles"], last["size0"], agree_txt, cold,
                         last["how"]))
        print(f"done {label}", file=sys.stderr)

    import psutil

    print(f"\nTissue + grid: {PATCH} px at {TARGET_MPP} µm/px, overlap 0, min tissue "
          f"{MIN_TISSUE}; {psutil.cpu_count()} CPU cores, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end; medians of "
          f"{args.repeats} interleaved processes x (1 first call + {args.calls} steady calls)\n")
    print("| input | tool | steady (s) | vs napari-gpfm | steady CPU (s) | vs napari-gpfm | "
          "first call (s) | vs napari-gpfm | import + first call (s) | tiles | "
          "agreement with the hand mask | detection |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for (label, name, first, steady, rf, rs, cpu, rc, n, size0, agree, cold, how) in rows:
        print(f"| {label} | {name} | {steady:.4f} | {rs:.2f}x | {cpu:.4f} | {rc:.2f}x | "
              f"{first:.3f} | {rf:.2f}x | {cold:.2f} | {n:,} ({size0} px) | {agree} | {how} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
