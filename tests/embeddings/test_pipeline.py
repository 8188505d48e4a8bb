"""The device pipeline on the CPU with a tiny model: batches in flight, compiled forward,
batch size from free memory, threads for the loader."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from embed_helpers import SAMPLE
from synthetic_slides import write_tiff

import napari_gpfm.embeddings.pipeline as pipeline
from napari_gpfm.embeddings import embed, embed_slide, open_store
from napari_gpfm.embeddings.pipeline import (
    AUTO_BATCH_CAP,
    MEMORY_FRACTION,
    BatchForward,
    CompileUnavailableWarning,
    auto_batch_size,
    per_patch_bytes,
)
from napari_gpfm.embeddings.run import cpu_threads_for, resolve_batch_size
from napari_gpfm.errors import NapariGpfmError
from napari_gpfm.slide import open_slide
from napari_gpfm.tiles import GridSpec, TissueParams

ALL = TissueParams(method="none")
SPEC = GridSpec(target_mpp=1.0, patch_size=224, min_tissue=0.0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def crop_tif(tmp_path_factory):
    rgb = open_slide(SAMPLE).read_region(600, 1000, 0, 1600, 1200)  # 3 x 2 patches
    return write_tiff(tmp_path_factory.mktemp("slides") / "Q.tif", rgb)


def patches(n: int, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))


def test_one_batch_in_flight_returns_the_same_features_in_order(encoder):
    batches = [patches(3, s) for s in range(4)]
    sync = BatchForward(encoder, CPU, "fp32", depth=0)
    ref = [sync.submit(b) for b in batches]
    assert all(r is not None for r in ref) and sync.drain() == []

    ahead = BatchForward(encoder, CPU, "fp32", depth=1)
    got = [ahead.submit(b) for b in batches]
    assert got[0] is None  # the pipeline is filling
    got = [g for g in got if g is not None] + ahead.drain()
    assert len(got) == 4
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_a_run_with_a_batch_in_flight_equals_a_synchronous_one_and_resumes(crop_tif, encoder,
                                                                          tmp_path):  # fmt: skip
    kw = dict(tissue_params=ALL, num_workers=0, batch_size=2)
    ref = open_store(embed(crop_tif, encoder, SPEC, tmp_path / "sync", pipeline_depth=0,
                           **kw)).features  # fmt: skip
    gen = embed_slide(crop_tif, encoder, SPEC, tmp_path / "ahead", pipeline_depth=1, **kw)
    for p in gen:
        if p.status == "running":
            assert p.done == 2  # written only once the next batch was launched
            break
    gen.close()  # cancelled with a batch in flight: it is not written, and recomputed
    records = list(embed_slide(crop_tif, encoder, SPEC, tmp_path / "ahead", pipeline_depth=1,
                               **kw))  # fmt: skip
    assert records[0].done == 2
    assert [r.done for r in records if r.status == "running"] == [4, 6]
    np.testing.assert_array_equal(open_store(records[-1].path).features, ref)


def test_compiled_forward_pads_the_last_batch_and_matches(encoder):
    eager = BatchForward(encoder, CPU, "fp32", depth=0)
    compiled = BatchForward(encoder, CPU, "fp32", depth=0, compiled=True,
                            compile_backend="eager")  # dynamo tracing without a C++ toolchain
    assert compiled.compiled
    for n in (4, 4, 3):  # the short last batch is padded to the compiled shape, then cut
        b = patches(n, n)
        got, ref = compiled.submit(b), eager.submit(b)
        assert got.shape == (n, encoder.embed_dim)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_compile_without_triton_is_off_with_a_message(encoder, monkeypatch):
    monkeypatch.setattr(pipeline, "compile_available",
                        lambda dev: "Triton is not installed (inductor needs it on CUDA)")
    with pytest.warns(CompileUnavailableWarning, match="--compile is off: Triton is not inst"):
        fwd = BatchForward(encoder, CPU, "fp32", compiled=True)
    assert not fwd.compiled
    assert fwd.submit(patches(2)).shape == (2, encoder.embed_dim)


def test_compile_available_needs_triton_on_cuda_only(monkeypatch):
    import torch.utils._triton as tt

    monkeypatch.setattr(tt, "has_triton", lambda: False)
    assert "Triton is not installed" in pipeline.compile_available(torch.device("cuda"))
    assert pipeline.compile_available(CPU) is None


def vit_large():
    with torch.device("meta"):  # the geometry, without 1.2 GB of weights
        return timm.create_model("vit_large_patch14_dinov2", img_size=224, init_values=1e-5,
                                 num_classes=0)  # fmt: skip


def test_per_patch_estimate_follows_the_stated_formula():
    model = vit_large()
    tokens, width, heads, hidden = 16 * 16 + 1, 1024, 16, 4096
    for precision, b in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
        expected = 2 * (tokens * (5 * width + hidden) * b + heads * tokens**2 * 4) + 15 * 224**2
        assert per_patch_bytes(model, 224, precision) == expected
    assert 15e6 < per_patch_bytes(model, 224, "fp16") < 25e6  # the docstring's ≈ 18.7 MB


def test_auto_batch_size_from_free_memory():
    model = vit_large()
    enc = SimpleNamespace(model=model, embed_dim=1024, input_size=224)
    cuda = torch.device("cuda")
    assert auto_batch_size(enc, cuda, "fp16", free_bytes=140 * 2**30) == AUTO_BATCH_CAP
    n = auto_batch_size(enc, cuda, "fp16", free_bytes=4 * 2**30)
    weights = 2 * sum(p.numel() for p in model.parameters())
    budget = MEMORY_FRACTION * 4 * 2**30 - weights
    per = per_patch_bytes(model, 224, "fp16")
    assert n % 8 == 0 and 0 < n <= budget / per < n + 8
    assert auto_batch_size(enc, cuda, "fp32", free_bytes=4 * 2**30) < n  # fp32 needs more
    assert auto_batch_size(enc, cuda, "fp16", free_bytes=2**20) == 1  # never 0
    assert auto_batch_size(enc, CPU, "fp32") == 4  # CPU: small batches, prompt Cancel


def test_auto_batch_size_refuses_a_model_it_cannot_size():
    enc = SimpleNamespace(model=torch.nn.Linear(4, 4), embed_dim=4, input_size=224)
    with pytest.raises(NapariGpfmError, match="give a batch size"):
        auto_batch_size(enc, torch.device("cuda"), "fp16", free_bytes=2**30)


def test_resolve_batch_size(encoder):
    assert resolve_batch_size(7, encoder, CPU, "fp32") == 7
    assert resolve_batch_size("auto", encoder, CPU, "fp32") == 16  # a 48-d tiny model
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        resolve_batch_size(0, encoder, CPU, "fp32")


def test_cpu_threads_depend_on_the_workers():
    assert cpu_threads_for(0, cpus=16) == 16
    assert cpu_threads_for(2, cpus=16) == 14
    assert cpu_threads_for(8, cpus=16) == 12  # at most a quarter of the cores for decoding
    assert cpu_threads_for(2, cpus=2) == 2  # small machines: the model keeps every core
    assert cpu_threads_for(1, cpus=1) == 1


def test_loader_workers_for_a_gpu_scale_with_the_cores(monkeypatch):
    import napari_gpfm.tiles.loader as loader

    monkeypatch.setattr(loader, "available_cpus", lambda: 32)
    assert loader.default_num_workers(torch.device("cuda")) == loader.GPU_MAX_WORKERS
    assert loader.default_num_workers("cuda:1") == loader.GPU_MAX_WORKERS
    assert loader.default_num_workers(CPU) == 2
    monkeypatch.setattr(loader, "available_cpus", lambda: 6)
    assert loader.default_num_workers("cuda") == 4


def test_no_warning_when_compile_is_not_asked(encoder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchForward(encoder, CPU, "fp32", compiled=False).submit(patches(1))


def test_fp32_on_cuda_switches_tf32_off_and_restores_it():
    from napari_gpfm.embeddings.pipeline import strict_fp32

    mm, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (mm.allow_tf32, conv.allow_tf32)
    try:
        mm.allow_tf32, conv.allow_tf32 = True, True
        with strict_fp32(torch.device("cuda"), "fp32"):
            assert (mm.allow_tf32, conv.allow_tf32) == (False, False)
        assert (mm.allow_tf32, conv.allow_tf32) == (True, True)
        with strict_fp32(torch.device("cuda"), "fp16"), strict_fp32(CPU, "fp32"):
            assert (mm.allow_tf32, conv.allow_tf32) == (True, True)  # not fp32 on CUDA
    finally:
        mm.allow_tf32, conv.allow_tf32 = before
