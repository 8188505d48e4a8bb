"""Benchmark the napari side: GUI responsiveness during an embed run, clustering to a Labels
layer at 100,000 patches, and a similarity click at 100,000 patches; prints a markdown table.

    python bench/bench_viewer.py                 # all three, ViT-S/14-sized random model
    python bench/bench_viewer.py --n 20000       # smaller synthetic slide for (b) and (c)
    python bench/bench_viewer.py --n 2000 --dim 64 --no-full-kmeans   # quick look (~30 s)

(a) A 10 ms QTimer runs on the Qt main thread while the "GPFM" dock embeds the sample slide in
    its worker; the worst gap between ticks beyond 10 ms is the longest freeze a user would feel
    (goal < 100 ms). Baselines: the same timer with nothing running, and the freeze of the naive
    design (running the embed loop on the main thread: the whole run).
(b) k-means of N synthetic 1024-d embeddings (MiniBatch above 20,000 patches) + the cluster
    Labels layer built, added and drawn (goal < 5 s). Baseline: full (Lloyd) k-means.
(c) One click -> cosine-similarity heatmap on the slide, top-k hits outlined and listed
    (goal < 200 ms). Baseline: scikit-learn ``cosine_similarity`` per click (re-normalises every
    feature vector each time) with the same layer work.

Renders on a private Xvfb display when there is no screen. Random weights: the model's cost,
not its quality, matters here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic_slides

VITS_CARD = """\
name: bench-vits14
display_name: ViT-S/14 random (benchmark)
is_gpfm: false
architecture:
  timm_name: vit_small_patch14_dinov2
  kwargs: {img_size: 224, num_classes: 0}
checkpoint_layout: timm
input: {size: 224, interpolation: bicubic, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
embed_dim: 384
weights: {file: null, env: null, default_path: null, hf_hub: null, url: null, sha256: null}
license: Apache-2.0
gated: false
recommended_tiles: {target_mpp: 0.5, patch_size: 224}
provenance: {}
"""
MPP = 0.5


def pump(app, seconds: float) -> None:
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.005)


class TickMonitor:
    """Worst delay of a 10 ms QTimer beyond its interval."""

    def __init__(self, interval_ms: int = 10):
        from qtpy.QtCore import QTimer

        self.interval = interval_ms / 1000
        self.gaps: list[float] = []
        self.when: list[float] = []
        self._last = None
        self._t0 = 0.0
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(now - self._last - self.interval)
            self.when.append(self._last - self._t0)
        self._last = now

    def start(self) -> None:
        self.gaps, self.when, self._last = [], [], None
        self._t0 = time.perf_counter()
        self.timer.start()

    def stop(self) -> dict:
        self.timer.stop()
        g = np.asarray(self.gaps) * 1000
        worst = int(np.argmax(g))
        return {"max_ms": float(g[worst]), "p99_ms": float(np.percentile(g, 99)),
                "ticks": len(g), "worst_at_s": self.when[worst]}  # fmt: skip


def bench_stall(viewer, app, tmp: Path, patch_size: int) -> dict:
    from napari_gpfm._qt.gpfm_widget import GPFMWidget
    from napari_gpfm._resources import sample_slide_path
    from napari_gpfm.embeddings import embed
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.layers.reader import layer_slide

    viewer.open(str(sample_slide_path()), plugin="napari-gpfm")
    dock = GPFMWidget(viewer, allow_random=True)
    viewer.window.add_dock_widget(dock, name="GPFM")
    dock.set_model("bench-vits14")
    if patch_size != 224:
        dock.preset_combo.setCurrentText("custom")
        dock.size_spin.setValue(patch_size)
    dock.out_edit.setText(str(tmp / "ui"))
    dock.session.set_out_dir(tmp / "ui")
    pump(app, 1.0)
    mon = TickMonitor()
    mon.start()
    pump(app, 3.0)
    idle = mon.stop()

    outcome: list[str] = []
    dock.run_finished.connect(outcome.append)
    mon.start()
    t0 = time.perf_counter()
    dock.compute()
    while not outcome:
        app.processEvents()
        time.sleep(0.001)
    run_s = time.perf_counter() - t0
    busy = mon.stop()
    state = dock.session_state()
    n = state.n if state is not None else 0

    # naive baseline: the same run on the main thread (the GUI is frozen for all of it)
    enc = load_encoder("bench-vits14", allow_random=True)
    t = time.perf_counter()
    embed(layer_slide(dock.current_layer()), enc, dock.spec(), tmp / "sync")
    sync_s = time.perf_counter() - t
    return {"idle": idle, "busy": busy, "run_s": run_s, "n": n, "sync_s": sync_s,
            "outcome": outcome[0]}  # fmt: skip


def synthetic_store(n: int, dim: int, k: int = 8, seed: int = 0):
    """A feature store of ``n`` 224 px patches on a square grid (``side`` patches a row) with
    ``k`` blocky clusters; returns ``(store, side)``."""
    from napari_gpfm.embeddings.store import FeatureStore

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    yy, xx = np.divmod(np.arange(n), side)
    coords = (np.stack([xx, yy], 1) * 224).astype(np.int64)
    blocks = rng.integers(0, k, size=(side // 16 + 1, side // 16 + 1))
    truth = blocks[yy // 16, xx // 16]
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    feats = rng.standard_normal((n, dim), dtype=np.float32)
    feats += 3 * centres[truth] / np.sqrt(dim)
    attrs = {"gpfm_model": "bench", "gpfm_mpp": MPP, "patch_size_level0": 224, "name": "big"}
    store = FeatureStore(Path("big.h5"), "gpfm", coords, attrs, _features=feats)
    return store, side


def open_big_slide(viewer, tmp: Path, n: int, dim: int):
    """A synthetic slide layer "big" (a tiled copy of the sample, as large as the grid) with a
    synthetic store of ``n`` patches attached; returns its state in the window's session."""
    from napari_gpfm.layers.session import session_for
    from synthetic_slides import make_large_pyramid

    store, side = synthetic_store(n, dim)
    path = make_large_pyramid(tmp / "big.tif", side * 224, side * 224, mpp=MPP)
    (layer,) = viewer.open(str(path), plugin="napari-gpfm")
    assert layer.name == "big", layer.name
    return session_for(viewer).attach_store(layer, store)


def bench_clusters(viewer, app, tmp: Path, n: int, dim: int, k: int, full: bool) -> dict:
    from napari_gpfm.analyses.clusters import kmeans
    from napari_gpfm.layers.session import session_for

    session = session_for(viewer)
    s = open_big_slide(viewer, tmp, n, dim)
    # napari JIT-compiles (numba) its label-colour kernels on the first Labels layer of a
    # session: a one-off cost, measured apart
    t = time.perf_counter()
    from napari_gpfm.analyses.heatmap import labels_raster
    from napari_gpfm.layers import convert

    warm = convert.labels_layer_data(labels_raster(np.arange(4), np.array(
        [[0, 0], [224, 0], [0, 224], [224, 224]]), 224, MPP), "warm-up")  # fmt: skip
    convert.upsert_layer(viewer, warm)
    app.processEvents()
    viewer.screenshot(canvas_only=True)
    viewer.layers.remove("warm-up")
    t_jit = time.perf_counter() - t
    t = time.perf_counter()
    res = kmeans(s.features, k)
    t_km = time.perf_counter() - t
    t = time.perf_counter()
    session.set_clusters(s.uid, res)
    session.show_clusters(s.uid)
    app.processEvents()
    viewer.screenshot(canvas_only=True)  # force a draw of the new layer
    t_layer = time.perf_counter() - t
    out = {"kmeans_s": t_km, "layer_s": t_layer, "method": res.method, "jit_s": t_jit}
    if full:
        t = time.perf_counter()
        kmeans(s.features, k, method="full")
        out["full_s"] = time.perf_counter() - t
    return out


def bench_click(viewer, app, repeat: int = 7) -> dict:
    from sklearn.metrics.pairwise import cosine_similarity

    from napari_gpfm._qt.gpfm_widget import GPFMWidget
    from napari_gpfm.analyses.heatmap import heatmap_raster
    from napari_gpfm.layers import convert

    dock = GPFMWidget(viewer)
    dock.select_slide("big")
    s = dock.session_state()
    rng = np.random.default_rng(1)
    picks = rng.integers(0, s.n, repeat + 1)
    dock.handle_click(s.centre(int(picks[0])))  # warm-up (first index build: normalisation)
    app.processEvents()
    times = []
    for i in picks[1:]:
        t = time.perf_counter()
        res = dock.handle_click(s.centre(int(i)))
        app.processEvents()
        times.append(time.perf_counter() - t)
        assert res.query.tolist() == [int(i)]
    base = []
    for i in picks[1:4]:
        t = time.perf_counter()
        scores = cosine_similarity(s.features, s.features[int(i) : int(i) + 1])[:, 0]
        ld = convert.heatmap_layer_data(heatmap_raster(scores, s.grid),
                                        "big · similarity (baseline)")  # fmt: skip
        convert.upsert_layer(viewer, ld)
        app.processEvents()
        base.append(time.perf_counter() - t)
    index_s = time.perf_counter()
    s._index = None
    s.index  # noqa: B018  one-off normalisation when a store is loaded
    index_s = time.perf_counter() - index_s
    return {"median_ms": 1000 * statistics.median(times), "max_ms": 1000 * max(times),
            "base_ms": 1000 * statistics.median(base), "index_s": index_s}  # fmt: skip


def bench_plot(viewer, app) -> dict:
    """Embedding plot at N points: draw, box and lasso selections (highlight layer included)."""
    from napari_gpfm._qt.plot_widget import EmbeddingPlotWidget
    from napari_gpfm.layers.session import session_for

    plot = EmbeddingPlotWidget(viewer)
    plot.canvas.size = (400, 400)
    s = session_for(viewer).slide("big")
    t = time.perf_counter()
    xy = s.project("pca")
    t_pca = time.perf_counter() - t
    t = time.perf_counter()
    plot.set_data(s.uid, xy)
    plot.canvas.render()
    t_draw = time.perf_counter() - t
    lo, hi = np.percentile(xy, 30, axis=0), np.percentile(xy, 70, axis=0)
    t = time.perf_counter()
    n_box = len(plot.select_box(lo, hi))
    app.processEvents()
    t_box = time.perf_counter() - t
    ang = np.linspace(0, 2 * np.pi, 200)
    poly = xy.mean(0) + np.stack([np.cos(ang), np.sin(ang)], 1) * xy.std(0)
    t = time.perf_counter()
    n_lasso = len(plot.select_polygon(poly))
    app.processEvents()
    t_lasso = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(10):  # pan: what a drag costs per frame
        plot.view.camera.pan((0.01, 0.0))
        plot.canvas.render()
    t_frame = (time.perf_counter() - t) / 10
    return {"pca_s": t_pca, "draw_ms": 1000 * t_draw, "box_ms": 1000 * t_box, "n_box": n_box,
            "lasso_ms": 1000 * t_lasso, "n_lasso": n_lasso, "frame_ms": 1000 * t_frame}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="synthetic patches for (b), (c)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--patch-size", type=int, default=224, help="patch px at 0.5 µm/px for (a)")
    ap.add_argument("--no-full-kmeans", action="store_true", help="skip the full k-means baseline")
    ap.add_argument("--skip-embed", action="store_true", help="skip (a)")
    args = ap.parse_args()

    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    from napari_gpfm._qt._display import ensure_display

    ensure_display()
    tmp = Path(tempfile.mkdtemp(prefix="bench_viewer_"))
    (tmp / "models").mkdir()
    (tmp / "models" / "bench-vits14.yaml").write_text(VITS_CARD)
    os.environ["NAPARI_GPFM_MODELS_DIR"] = str(tmp / "models")
    os.environ["NAPARI_GPFM_FEATURES_DIR"] = str(tmp / "features")  # not the user's cache

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_gpfm._qt._workers import avoid_llvm_clash

    avoid_llvm_clash()  # before the first GL context (see its docstring)
    viewer = napari.Viewer(show=False)
    app = QApplication.instance()
    rows = []
    if not args.skip_embed:
        a = bench_stall(viewer, app, tmp, args.patch_size)
        rows += [
            ("(a) worst event-loop stall, idle (timer jitter)", f"{a['idle']['max_ms']:.1f} ms",
             "", ""),
            (f"(a) worst stall while embedding ({a['n']} patches, ViT-S/14, "
             f"{a['run_s']:.1f} s run)", f"{a['busy']['max_ms']:.1f} ms "
             f"(p99 {a['busy']['p99_ms']:.1f} ms, worst at {a['busy']['worst_at_s']:.1f} s)",
             "< 100 ms",
             f"{1000 * a['sync_s']:.0f} ms (run on main thread)"),
        ]  # fmt: skip
        for la in list(viewer.layers):
            viewer.layers.remove(la)
    b = bench_clusters(viewer, app, tmp, args.n, args.dim, args.k, not args.no_full_kmeans)
    rows.append((f"(b) k-means ({b['method']}) of {args.n:,}×{args.dim} + Labels layer",
                 f"{b['kmeans_s'] + b['layer_s']:.2f} s ({b['kmeans_s']:.2f} + "
                 f"{b['layer_s']:.2f})", "< 5 s",
                 f"{b['full_s']:.2f} s (full k-means only)" if "full_s" in b else ""))  # fmt: skip
    rows.append(("(b) one-off: napari's numba JIT on the first Labels layer of a session",
                 f"{b['jit_s']:.2f} s", "", ""))  # fmt: skip
    c = bench_click(viewer, app)
    rows.append((f"(c) click → similarity heatmap + top-k at {args.n:,} patches",
                 f"{c['median_ms']:.0f} ms (max {c['max_ms']:.0f})", "< 200 ms",
                 f"{c['base_ms']:.0f} ms (sklearn cosine_similarity per click)"))  # fmt: skip
    rows.append(("(c) one-off index build when a store is loaded", f"{c['index_s']:.2f} s", "",
                 ""))  # fmt: skip
    d = bench_plot(viewer, app)
    rows += [
        (f"(d) embedding plot: PCA of {args.n:,} patches (worker)", f"{d['pca_s']:.2f} s", "", ""),
        (f"(d) plot {args.n:,} points, first draw", f"{d['draw_ms']:.0f} ms", "", ""),
        ("(d) plot pan, per frame", f"{d['frame_ms']:.0f} ms", "", ""),
        (f"(d) box select ({d['n_box']:,} points) + slide highlight", f"{d['box_ms']:.0f} ms",
         "", ""),
        (f"(d) lasso select, 200 vertices ({d['n_lasso']:,} points) + slide highlight",
         f"{d['lasso_ms']:.0f} ms", "", ""),
    ]  # fmt: skip
    viewer.close()

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.1f}, napari {napari.__version__}\n")  # fmt: skip
    print("| step | measured | goal | baseline |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
