"""Precision is part of the recipe: recorded, keyed, and never mixed when resuming."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from embed_helpers import SAMPLE
from synthetic_slides import write_tiff

from napari_gpfm.embeddings import (
    PrecisionMismatchError,
    RecipeMismatchError,
    embed,
    embed_slide,
    find_store,
    make_recipe,
    open_store,
)
from napari_gpfm.embeddings.store import meta_digest
from napari_gpfm.encoders.device import (
    PRECISION_CHOICES,
    PrecisionError,
    autocast,
    resolve_precision,
)
from napari_gpfm.slide import open_slide
from napari_gpfm.tiles import GridSpec, TissueParams

ALL = TissueParams(method="none")
SPEC = GridSpec(target_mpp=1.0, patch_size=224, min_tissue=0.0)  # 2 x 2 patches of the crop


@pytest.fixture(scope="module")
def crop_tif(tmp_path_factory):
    rgb = open_slide(SAMPLE).read_region(600, 1000, 0, 1200, 1200)
    return write_tiff(tmp_path_factory.mktemp("slides") / "P.tif", rgb)


def run(tif, encoder, out, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 1)
    return embed(tif, encoder, SPEC, out, tissue_params=ALL, **kw)


# -- resolving ---------------------------------------------------------------------------------


def test_auto_is_fp32_on_cpu_and_fp16_on_cuda(monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision(None, "cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("FP32", torch.device("cuda")) == "fp32"


def test_unknown_precision_and_unsupported_bf16_are_refused(monkeypatch):
    with pytest.raises(PrecisionError, match="unknown precision 'fp8'.*auto, fp32, fp16, bf16"):
        resolve_precision("fp8", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(PrecisionError, match="Tesla V100 does not support bfloat16"):
        resolve_precision("bf16", torch.device("cuda"))


def test_half_precisions_run_as_cpu_autocast():
    """fp16 and bf16 are honoured on the CPU (torch's CPU autocast), not silently fp32."""
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    cpu = torch.device("cpu")
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with autocast(cpu, precision=name):
            assert lin(x).dtype == dtype, name
    with autocast(cpu):  # the training rule is unchanged: nothing on the CPU
        assert lin(x).dtype == torch.float32


def test_cli_choices_are_the_devices_choices():
    from napari_gpfm.jobs._cli import PRECISION_CHOICES as CLI

    assert CLI == PRECISION_CHOICES


# -- recorded ----------------------------------------------------------------------------------


def test_precision_and_device_are_recorded(crop_tif, encoder, tmp_path):
    path = run(crop_tif, encoder, tmp_path)  # auto on the CPU
    store = open_store(path)
    assert store.recipe.precision == "fp32" and store.precision == "fp32"
    assert store.recipe.device == "cpu"
    with h5py.File(path, "r") as f:
        assert f.attrs["gpfm_precision"] == "fp32" and f.attrs["gpfm_device"] == "cpu"
    assert "fp32" in store.describe()


def test_half_precision_on_cpu_is_recorded_and_close_to_fp32(crop_tif, encoder, tmp_path):
    ref = open_store(run(crop_tif, encoder, tmp_path / "fp32")).features
    for name in ("bf16", "fp16"):
        store = open_store(run(crop_tif, encoder, tmp_path / name, precision=name))
        assert store.precision == name
        assert store.recipe.key() != make_recipe(encoder, open_slide(crop_tif), SPEC, ALL).key()
        f = store.features
        rel = np.linalg.norm(f - ref) / np.linalg.norm(ref)
        assert 0 < rel < 0.05, (name, rel)  # computed in half precision, and still the model


# -- refused -----------------------------------------------------------------------------------


def test_a_finished_store_of_another_precision_is_refused(crop_tif, encoder, tmp_path):
    path = run(crop_tif, encoder, tmp_path)  # fp32
    with pytest.raises(PrecisionMismatchError) as e:
        run(crop_tif, encoder, tmp_path, precision="bf16")
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "computed in fp32" in msg and "asks for bf16" in msg
    assert isinstance(e.value, RecipeMismatchError)  # callers offering "overwrite" still work
    bf16 = make_recipe(encoder, open_slide(crop_tif), SPEC, ALL, precision="bf16")
    with pytest.raises(PrecisionMismatchError):
        find_store(tmp_path, open_slide(crop_tif), bf16)
    assert open_store(run(crop_tif, encoder, tmp_path, precision="bf16",
                          overwrite=True)).precision == "bf16"  # fmt: skip


def _partial(crop_tif, encoder, out, **kw):
    """Embed one patch of four, then cancel: a resumable partial store."""
    gen = embed_slide(crop_tif, encoder, SPEC, out, tissue_params=ALL, batch_size=1,
                      num_workers=0, **kw)  # fmt: skip
    for p in gen:
        if p.status == "running":
            break
    gen.close()
    (part,) = out.rglob("*.partial")
    return part


def test_resuming_in_another_precision_is_refused(crop_tif, encoder, tmp_path):
    part = _partial(crop_tif, encoder, tmp_path)  # fp32, 1 of 4 done
    before = part.read_bytes()
    with pytest.raises(PrecisionMismatchError) as e:
        run(crop_tif, encoder, tmp_path, precision="fp16")
    msg = str(e.value)
    assert msg.startswith(f"{part}: ") and "fp32" in msg and "fp16" in msg and "resume" in msg
    assert part.read_bytes() == before  # untouched, still resumable in fp32
    records = list(embed_slide(crop_tif, encoder, SPEC, tmp_path, tissue_params=ALL,
                               batch_size=1, num_workers=0))  # fmt: skip
    assert records[0].done == 1 and open_store(records[-1].path).precision == "fp32"


def _make_legacy(path, device=None):
    """Rewrite a store as napari-gpfm 0.2 wrote it: no precision, no device (or ``device``)."""
    with h5py.File(path, "a") as f:
        recipe = json.loads(f.attrs["gpfm_recipe"])
        recipe.pop("precision"), recipe.pop("device")
        if device is not None:
            recipe["device"] = device
        from napari_gpfm.embeddings import EmbeddingRecipe

        f.attrs["gpfm_recipe"] = json.dumps(recipe, sort_keys=True)
        f.attrs["gpfm_recipe_key"] = EmbeddingRecipe.from_dict(recipe).key()
        for k in ("gpfm_precision", "gpfm_device"):
            del f.attrs[k]
        f.attrs["gpfm_meta_sha256"] = meta_digest(f.attrs)


def test_a_store_without_precision_or_device_is_refused_but_opens(crop_tif, encoder, tmp_path):
    part = _partial(crop_tif, encoder, tmp_path)
    _make_legacy(part)
    with pytest.raises(PrecisionMismatchError, match="records no precision") as e:
        run(crop_tif, encoder, tmp_path)
    assert str(e.value).startswith(f"{part}: ")

    done = run(crop_tif, encoder, tmp_path / "fin")
    _make_legacy(done)
    with pytest.raises(PrecisionMismatchError, match="records no precision"):
        run(crop_tif, encoder, tmp_path / "fin")
    store = open_store(done)  # viewing stays allowed
    assert store.precision is None and store.features.shape[0] == 4


def test_a_store_without_precision_but_with_its_device_is_what_it_ran(crop_tif, encoder,
                                                                     tmp_path):  # fmt: skip
    part = _partial(crop_tif, encoder, tmp_path)
    _make_legacy(part, device="cpu")  # made on the CPU before 0.3: fp32
    with pytest.raises(PrecisionMismatchError, match="computed in fp32 but this run asks for bf"):
        run(crop_tif, encoder, tmp_path, precision="bf16")
    records = list(embed_slide(crop_tif, encoder, SPEC, tmp_path, tissue_params=ALL,
                               batch_size=1, num_workers=0))  # fmt: skip
    assert records[0].done == 1  # resumed as the fp32 it was
    assert open_store(records[-1].path).precision == "fp32"
