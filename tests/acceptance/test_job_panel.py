"""The JobPanel every dock runs its jobs with: no full garbage collection while a job runs (a
full collection of napari's and torch's heap holds the GIL for up to a second, freezing the
window), and a burst of progress records repaints the panel a few times, not once per record
(each repaint recomposes a window holding napari's OpenGL canvas)."""

from __future__ import annotations

import gc
import time

from napari_gpfm._qt._jobs import JobGc, JobPanel
from napari_gpfm.jobs.progress import Progress

N = 300


def test_a_job_runs_without_full_collections_and_repaints_its_progress_sparingly(qtbot):
    panel = JobPanel("Test job")
    qtbot.addWidget(panel)
    panel.show()
    shown: list[str] = []
    say = panel.say
    panel.say = lambda text, error=False: (shown.append(text), say(text, error))
    seen: dict = {}

    def job():
        seen["threshold"] = gc.get_threshold()
        for i in range(N):
            yield Progress("test", "counting", i + 1, N, unit="items", message=f"item {i + 1}")
        seen["still"] = gc.get_threshold()
        return "result"

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    results = []
    with qtbot.waitSignal(panel.finished, timeout=30_000) as blocker:
        panel.run(job(), on_result=results.append)
    assert blocker.args == ["done"] and results == ["result"]
    # while it ran: young collections only; after: napari's settings back, survivors frozen
    assert seen["threshold"][:2] == before[:2]
    assert seen["threshold"][2] >= JobGc.HELD_THRESHOLD and seen["still"] == seen["threshold"]
    assert gc.get_threshold() == before and JobGc.running == 0
    assert gc.get_freeze_count() >= frozen
    # every record kept, the last one shown, but far fewer repaints than records
    assert panel.last_progress.done == N
    assert shown[-1] == "item 300" and panel.bar.value() == N
    assert len(shown) < N // 10, len(shown)


def _endless():
    i = 0
    while True:
        i += 1
        yield Progress("test", "counting", i, 10**9, unit="items")


def test_cancel_has_the_last_word_and_a_closed_panel_gives_collections_back(qtbot):
    """After Cancel, no progress record still waiting paints over "Cancelled"; a panel deleted
    while its job runs (its dock closed) gives back the hold on full garbage collections."""
    panel = JobPanel("Test job")
    qtbot.addWidget(panel)
    panel.show()
    with qtbot.waitSignal(panel.finished, timeout=30_000):
        panel.run(_endless())
        qtbot.waitUntil(lambda: panel.last_progress is not None, timeout=10_000)
        panel.cancel()
    qtbot.wait(2 * int(1000 * JobPanel.MIN_PAINT_S) + 100)  # a pending repaint would land now
    assert panel.status.text().startswith("Cancelled")

    def one_second():
        for i in range(20):
            time.sleep(0.05)
            yield Progress("test", "counting", i + 1, 20, unit="items")

    running = JobGc.running
    other = JobPanel("Closed mid-job")
    other.run(one_second())
    assert JobGc.running == running + 1
    other.deleteLater()
    qtbot.waitUntil(lambda: JobGc.running == running, timeout=10_000)


WARM_CHECK = r"""
import numpy as np
from napari.components import ViewerModel
from napari.utils.colormaps import _accelerated_cmap as acc

from napari_gpfm._qt._jobs import JobPanel, warm_label_painting  # noqa: F401
from napari_gpfm.analyses.heatmap import labels_raster
from napari_gpfm.layers import convert

loop = acc._labels_raw_to_texture_direct_inner_loop
warm_label_painting()
warmed = set(loop.signatures)
coords = np.array([[x, y] for y in range(0, 640, 64) for x in range(0, 640, 64)])
model = ViewerModel()
for k in (3, 255):  # a class map and the largest uint8 map
    raster = labels_raster(np.arange(len(coords)) % k, coords, 64, 0.5)
    data, kwargs, kind = convert.labels_layer_data(raster, f"map {k}")
    model.add_labels(data, **kwargs)
print("NEW", len(set(loop.signatures) - warmed), "WARMED", len(warmed))
"""


def test_the_first_class_map_of_a_session_compiles_nothing_on_the_main_thread(tmp_path):
    """With numba installed (umap-learn brings it) napari compiles its label-colour kernels the
    first time it shows a Labels layer: 1.5–2 s of frozen window at the first class or cluster
    map. Every job warms them first in its worker thread; afterwards adding our result maps
    (uint8 data, up to 255 labels) compiles nothing more. In a fresh process: earlier tests of this
    one have compiled them already."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("numba")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}  # no compiled code from earlier runs
    out = subprocess.run([sys.executable, "-c", WARM_CHECK], capture_output=True, text=True,
                         env=env, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(s for s in out.stdout.splitlines() if s.startswith("NEW"))
    new, warmed = int(line.split()[1]), int(line.split()[3])
    assert warmed >= 1 and new == 0, line


LIBS_CHECK = r"""
import sys
from napari_gpfm._qt._jobs import prefetch_torch_libraries

done = prefetch_torch_libraries() if sys.argv[1] == "prefetch" else None
import torch

assert float(torch.ones(3).sum()) == 3.0
libs = sorted({line.split()[-1] for line in open("/proc/self/maps")
               if "/torch/" in line or "/nvidia/" in line})
print("DONE", done)
print("\n".join(libs))
"""


def test_torch_libraries_prefetched_without_the_gil_are_the_ones_torch_loads(tmp_path):
    """Jobs load torch's native libraries with the GIL released before the first
    ``import torch`` (whose own loading froze the window 0.25-0.8 s): the same files end up
    loaded as when torch loads them itself, and with LD_LIBRARY_PATH set (where torch's own
    order decides which CUDA wins) nothing is prefetched."""
    import os
    import subprocess
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("the prefetch is for Linux")
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}

    def run(mode: str, extra: dict | None = None) -> tuple[str, list[str]]:
        out = subprocess.run([sys.executable, "-c", LIBS_CHECK, mode], capture_output=True,
                             text=True, env={**env, **(extra or {})}, timeout=300,
                             check=False)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        first, *libs = out.stdout.strip().splitlines()
        return first, libs

    done, prefetched = run("prefetch")
    plain_done, plain = run("plain")
    assert done == "DONE True" and plain_done == "DONE None"
    assert prefetched == plain and any("libtorch_cpu" in p for p in plain)
    assert run("prefetch", {"LD_LIBRARY_PATH": str(tmp_path)})[0] == "DONE False"
