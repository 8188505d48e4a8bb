"""Benchmark the tile galleries: time from "show these 50 patches" to 50 thumbnails painted.

    python bench/bench_gallery.py                  # sample slide + 100,000 px synthetic pyramid
    python bench/bench_gallery.py --no-large       # the sample slide only (seconds)

A napari window (1280×800) with the GPFM dock; a feature store with every 224 px patch of the
slide (0.5 µm/px grid) is attached to its slide layer. Each trial picks 50 random patches and
sets them as the similarity-hits gallery: the tiles (placeholders and captions) appear at once,
the thumbnails (96 px, read from the slide at the store's recipe in a worker thread) follow; the
time measured ends when the gallery has painted all 50 pictures (goal < 0.5 s). Cold: the
shared native-tile cache emptied before each trial (patches never looked at); warm: the same
patches again. Baseline in the same run: the naive design, reading the 50 patches one by one
on the main thread at full patch size and scaling them in Qt (the GUI frozen meanwhile).

The 100,000 × 100,000 px pyramid (built from the sample's tissue, 7 levels) is the worst case:
50 patches scattered over a large slide share no native tile. Renders on a private Xvfb display
when there is no screen. Prints a markdown table and a line for the README.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic_slides

PATCH = 224  # px at 0.5 µm/px
N_TILES = 50


def grid_store(slide, path: Path):
    """A feature store (random 32-d features) with every 224 px patch of ``slide``."""
    from napari_gpfm.embeddings.store import FeatureStore

    mpp = float(slide.mpp)
    p0 = round(PATCH * 0.5 / mpp)
    w, h = slide.dimensions
    ys, xs = np.mgrid[0 : h - p0 + 1 : p0, 0 : w - p0 + 1 : p0]
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    feats = np.random.default_rng(0).normal(size=(len(coords), 32)).astype(np.float32)
    attrs = {"gpfm_model": "bench", "gpfm_mpp": mpp, "patch_size_level0": p0,
             "name": slide.name}  # fmt: skip
    return FeatureStore(path, "gpfm", coords, attrs, _features=feats)


def pump(app, seconds: float) -> None:
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.005)


def show_gallery(app, gallery, tiles) -> float:
    """Seconds from set_tiles to all thumbnails painted; the main thread waits in a Qt event
    loop, idle as in use (no busy polling taking the GIL from the reading thread)."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    gallery.loaded.connect(loop.quit)
    QTimer.singleShot(30_000, loop.quit)
    t0 = time.perf_counter()
    gallery.set_tiles(tiles)
    if not gallery.ready:
        loop.exec()
    gallery.loaded.disconnect(loop.quit)
    gallery.viewport().repaint()  # the pictures on screen (synchronous paint)
    if gallery.error:
        raise RuntimeError(gallery.error)
    return time.perf_counter() - t0


def naive(app, gallery, state, idx) -> float:
    """Main-thread baseline: read each full-size patch, scale it in Qt, then paint."""
    from qtpy.QtCore import Qt
    from qtpy.QtGui import QIcon, QImage, QPixmap
    from qtpy.QtWidgets import QListWidgetItem

    t0 = time.perf_counter()
    gallery.clear()
    P = state.patch_size_level0
    for i in idx:
        x, y = state.coords[i]
        img = np.ascontiguousarray(state.slide.read_region(int(x), int(y), 0, P, P))
        q = QImage(img.tobytes(), P, P, 3 * P, QImage.Format.Format_RGB888)
        pm = QPixmap.fromImage(q).scaled(96, 96, Qt.AspectRatioMode.KeepAspectRatio,
                                         Qt.TransformationMode.SmoothTransformation)
        gallery.addItem(QListWidgetItem(QIcon(pm), f"{i}"))
    gallery.viewport().repaint()
    app.processEvents()
    return time.perf_counter() - t0


def bench_slide(viewer, app, dock, path: Path, tmp: Path, trials: int) -> dict:
    from napari_gpfm.layers.gallery import Tile
    from napari_gpfm.slide import shared_tile_cache

    (layer,) = viewer.open(str(path), plugin="napari-gpfm")
    session = dock.session
    s = session.slide(layer)
    session.attach_store(s.uid, grid_store(s.slide, tmp / f"{s.slide.name}.h5"))
    gallery = dock.hits_gallery
    gallery.setVisible(True)
    dock.scroll.ensureWidgetVisible(gallery)
    pump(app, 0.5)
    rng = np.random.default_rng(1)
    cold, warm, base = [], [], []
    show_gallery(app, gallery, [Tile(s.uid, 0, s.name, 1.0, "cosine")])  # worker warm-up
    for _ in range(trials):
        idx = rng.choice(s.n, min(N_TILES, s.n), replace=False)
        tiles = [Tile(s.uid, int(i), s.name, float(rng.random()), "cosine") for i in idx]
        shared_tile_cache().clear()
        cold.append(show_gallery(app, gallery, tiles))
        warm.append(show_gallery(app, gallery, tiles))
        shared_tile_cache().clear()
        base.append(naive(app, gallery, s, idx))
    viewer.layers.remove(layer)
    w, h = s.slide.dimensions
    return {"slide": f"{path.name} ({w:,} × {h:,} px, {s.n:,} patches)", "cold": cold,
            "warm": warm, "base": base}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--no-large", action="store_true", help="skip the 100,000 px pyramid")
    args = ap.parse_args()

    from napari_gpfm._qt._display import ensure_display

    ensure_display()
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_gpfm._resources import sample_slide_path
    from synthetic_slides import make_large_pyramid

    tmp = Path(tempfile.mkdtemp(prefix="bench_gallery_"))
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    app = QApplication.instance()
    _, dock = viewer.window.add_plugin_dock_widget("napari-gpfm", "GPFM")
    pump(app, 0.5)
    slides = [sample_slide_path()]
    if not args.no_large:
        slides.append(make_large_pyramid(tmp / "large.tif", 100_000, 100_000))
    rows = [bench_slide(viewer, app, dock, p, tmp, args.trials) for p in slides]
    viewer.close()

    def ms(v: list[float]) -> str:
        return f"{1000 * statistics.median(v):.0f} ms (worst {1000 * max(v):.0f})"

    print(f"\n{N_TILES} tiles of 96 px from 224 px patches, {args.trials} trials, median (worst):\n")
    print("| slide | cold cache | warm cache | naive, main thread (GUI frozen) | goal |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['slide']} | {ms(r['cold'])} | {ms(r['warm'])} | {ms(r['base'])} | "
              "< 500 ms |")  # fmt: skip
    worst = max(max(r["cold"]) for r in rows)
    print(f"\nREADME: | gallery of {N_TILES} tiles (similarity hits), click → thumbnails "
          f"painted, cold cache | {1000 * worst:.0f} ms worst "
          f"({1000 * statistics.median(rows[-1]['cold']):.0f} ms median) | < 500 ms | "
          f"{1000 * statistics.median(rows[-1]['base']):.0f} ms reading on the main thread |")
    return 0 if worst < 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
