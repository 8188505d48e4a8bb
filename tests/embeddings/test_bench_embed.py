"""bench/bench_embed.py runs on the CPU with a tiny model and prints one row per precision
(model-only, end-to-end, ratio). No timing is asserted: the figures are the bench's business."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_embed.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_embed", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_prints_model_only_end_to_end_and_ratio_per_precision(capsys, monkeypatch,
                                                                   tmp_path):  # fmt: skip
    bench = load_bench()
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(tmp_path))
    assert bench.main(["--model", "tiny", "--device", "cpu", "--patches", "9",
                       "--precisions", "fp32,bf16", "--num-workers", "0",
                       "--min-seconds", "0", "--batch-size", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "vit_small_patch14_dinov2 at 56 px" in out and "9 patches" in out
    rows = [ln for ln in out.splitlines() if re.match(r"\| (fp32|fp16|bf16) \|", ln)]
    assert [r.split("|")[1].strip() for r in rows] == ["fp32", "bf16"]
    for r in rows:
        cells = [c.strip().strip("*").replace(",", "") for c in r.strip("|").split("|")]
        batch, model, steady, wall, ratio = cells[1:]
        assert batch == "4"
        model, steady, wall, ratio = map(float, (model, steady, wall, ratio))
        assert model > 0 and steady > 0 and wall > 0
        assert abs(ratio - steady / model) < 0.01 * ratio + 0.006  # the ratio of the two shown
