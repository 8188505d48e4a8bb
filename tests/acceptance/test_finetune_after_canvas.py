"""The Finetune dock opened after napari's canvas has drawn (Mesa's LLVM is then loaded):
it must run a distillation without crashing. Own process: the Triton/LLVM guard acts once per
process, and a crash must fail this test, not the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys, time
    import napari
    from qtpy.QtWidgets import QApplication
    viewer = napari.Viewer(show=True)
    viewer.open(sys.argv[1], plugin="napari-gpfm")
    viewer.screenshot(canvas_only=True)  # the canvas draws: an OpenGL context exists now
    llvm = any("libLLVM" in line for line in open("/proc/self/maps"))
    _, dock = viewer.window.add_plugin_dock_widget("napari-gpfm", "Finetune (distillation)")
    dock.config_combo.setCurrentText("tiny_cpu")
    dock.out_edit.setText(sys.argv[2])
    dock.steps_spin.setValue(2)
    dock.extra_edit.setText("train.progress=false data.num_workers=0 train.batch_size=4 "
                            "crops.local_number=2")
    dock.start_button.click()
    t0 = time.time()
    while dock.worker is not None and time.time() - t0 < 240:
        QApplication.processEvents()
        time.sleep(0.01)
    print("LLVM", llvm, "TRITON", sys.modules.get("triton", "absent"))
    print("STATUS", dock.status.text())
    viewer.close()
''')


def test_finetune_dock_after_the_canvas_drew(sample_svs, tmp_path):
    env = dict(os.environ, NAPARI_GPFM_MODELS_DIR=str(tmp_path / "models"))
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(sample_svs), str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "student saved" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    if "LLVM True" in out.stdout:  # Mesa's LLVM is mapped: Triton must have been kept out
        assert "TRITON None" in out.stdout, out.stdout
