"""Benchmark the feature-store integrity checks: what opening a checksummed store costs.

A store of 100,000 patches × 1024-d float32 (410 MB, the size of a large slide embedded with
GPFM) is written once with ``StoreWriter`` (chunks of 64 patches, as an embed run writes them),
then opened repeatedly, alternating runs with and without the checks:

1. ``open_store(path)`` — reads the attributes and the coords. With the checks it also verifies
   the metadata digest (``gpfm_meta_sha256``) and that the checksums exist
   (``store._check_integrity``). Goal: < 5 % more than without.
2. ``open_store(path).features`` — the first read of the features, which verifies the coords
   and every written chunk of features against their checksums (``store._verify_features``,
   the lazy part of the check, documented in ``napari_gpfm/embeddings/store.py``). Reported
   for information.

"Without" replaces those two functions by no-ops; everything else is the same code. Times are
medians of ``--repeats`` alternating runs (page cache warm: the worst case for the relative
cost, since a cold read costs more I/O and the same checksum time). Prints a markdown table and
the ratio of the open. Example::

    python bench/bench_store_integrity.py                 # 100,000 × 1024
    python bench/bench_store_integrity.py --patches 20000 --repeats 21
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from napari_gpfm.embeddings import EmbeddingRecipe, StoreWriter, open_store  # noqa: E402
from napari_gpfm.embeddings import store as store_mod  # noqa: E402


def make_store(path: Path, n: int, dim: int, chunk: int) -> Path:
    side = int(np.ceil(np.sqrt(n)))
    ys, xs = np.divmod(np.arange(n, dtype=np.int64), side)
    coords = np.stack([xs, ys], 1) * 448
    recipe = EmbeddingRecipe(
        model="gpfm", weights_sha256="0" * 64, mpp=0.25, mpp_source="file", target_mpp=0.5,
        patch_size=224, input_size=224, patch_size_level0=448, overlap=0, min_tissue=0.5,
        tissue_params={}, versions={"napari_gpfm": "bench"},
    )  # fmt: skip
    w = StoreWriter.create(path, recipe=recipe, coords=coords, embed_dim=dim, slide_name="bench",
                           level0_width=side * 448, level0_height=side * 448)  # fmt: skip
    rng = np.random.default_rng(0)
    block = rng.standard_normal((chunk, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        w.write(block[: min(chunk, n - start)] + np.float32(start))
    return w.finish()


def _noop(*args, **kwargs) -> None:
    return None


def timed(fn, checks: bool) -> float:
    saved = store_mod._check_integrity, store_mod._verify_features
    if not checks:
        store_mod._check_integrity, store_mod._verify_features = _noop, _noop
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        store_mod._check_integrity, store_mod._verify_features = saved


def compare(fn, repeats: int) -> tuple[float, float]:
    """(median without, median with) over alternating runs (one warm-up each)."""
    timed(fn, True), timed(fn, False)
    with_, without = [], []
    for _ in range(repeats):
        with_.append(timed(fn, True))
        without.append(timed(fn, False))
    return statistics.median(without), statistics.median(with_)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patches", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64, help="patches per written chunk")
    ap.add_argument("--repeats", type=int, default=41, help="alternating runs for the open")
    ap.add_argument("--read-repeats", type=int, default=7, help="runs for the features read")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the store")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        path = make_store(Path(tmp) / "bench.h5", args.patches, args.dim, args.chunk)
        t_write = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
        open_without, open_with = compare(lambda: open_store(path), args.repeats)
        read_without, read_with = compare(lambda: open_store(path).features, args.read_repeats)

    ratio_open = open_with / open_without
    ratio_read = read_with / read_without
    print(f"store: {args.patches:,} patches × {args.dim} float32 ({size_mb:.0f} MB), written in "
          f"{t_write:.1f} s in chunks of {args.chunk}\n")  # fmt: skip
    print("| operation | without checks | with checks | ratio |")
    print("|---|---|---|---|")
    print(f"| open_store (attrs, coords; metadata verified) | {open_without * 1e3:.2f} ms"
          f" | {open_with * 1e3:.2f} ms | {ratio_open:.3f} |")  # fmt: skip
    print(f"| open_store + first read of the features (coords, every chunk verified) | "
          f"{read_without * 1e3:.0f} ms | {read_with * 1e3:.0f} ms | {ratio_read:.2f} |")
    print(f"\nopen ratio (with / without checks): {ratio_open:.3f} "
          f"({'meets' if ratio_open < 1.05 else 'MISSES'} the < 1.05 goal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
