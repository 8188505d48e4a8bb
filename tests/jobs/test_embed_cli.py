"""`napari-gpfm embed` over the embed job: many slides, failures reported and survived, torchrun
sharding, interrupted runs resumed, and a re-run over an embedded cohort that never builds the
model."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_card

import napari_gpfm.jobs.embed as embed_job
from napari_gpfm.embeddings import open_store, store_path, tiling_dir_name
from napari_gpfm.jobs._cli import main, register, run_embed

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"
TINY = "tiny-test"
QUICK = ["--model", TINY, "--allow-random-weights", "--num-workers", "0", "--batch-size", "32"]


@pytest.fixture(autouse=True)
def tiny_models_dir(tmp_path_factory, monkeypatch) -> Path:
    """The tiny test card (224 px at 0.5 µm/px), no torchrun environment, and an empty encoder
    cache (an encoder built by an earlier test must not hide a model build)."""
    d = tmp_path_factory.getbasetemp() / "jobs-cli-models"
    d.mkdir(exist_ok=True)
    (d / f"{TINY}.yaml").write_text(tiny_card(TINY, 224))
    monkeypatch.setenv("NAPARI_GPFM_MODELS_DIR", str(d))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(embed_job, "_ENCODERS", {})
    return d


@pytest.fixture
def nompp_tiff(tmp_path: Path) -> Path:
    """A slide without mpp: part of the sample slide, no resolution tags."""
    import tifffile

    from napari_gpfm.slide import open_slide

    s = open_slide(SAMPLE)
    rgb = s.read_region(600, 1000, 0, 1200, 1200)
    s.close()
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="zlib")
    return path


def links(tmp_path, sample_path, names):
    d = tmp_path / "slides"
    d.mkdir(exist_ok=True)
    out = []
    for n in names:
        p = d / n
        p.symlink_to(sample_path)
        out.append(str(p))
    return out


def no_model(monkeypatch):
    """Any attempt to build an encoder (through the job or directly) fails the test."""
    import napari_gpfm.encoders

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(embed_job, "_encoder", refuse)
    monkeypatch.setattr(napari_gpfm.encoders, "load_encoder", refuse)


def test_register_adds_embed_subcommand():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["embed", "a.svs", "b.svs", "--out", "o", "--magnification", "40"])
    assert args.slides == ["a.svs", "b.svs"] and callable(args.func)
    with pytest.raises(SystemExit):  # --target-mpp and --magnification exclude each other
        parser.parse_args(["embed", "a.svs", "--out", "o", "--target-mpp", "0.5",
                           "--magnification", "20"])


def test_the_dispatcher_runs_the_jobs_embed_command():
    from napari_gpfm import cli

    args = cli.build_parser().parse_args(["embed", "a.svs", "--out", "o"])
    assert args.func is run_embed


def test_rerun_over_an_embedded_cohort_builds_no_model(tmp_path, sample_path, monkeypatch,
                                                       capsys):
    import napari_gpfm.analyses.similarity as similarity

    def no_index(*args, **kwargs):
        raise AssertionError("the command line built a similarity index")

    monkeypatch.setattr(similarity, "SimilarityIndex", no_index)
    (tmp_path / "slides").mkdir()
    copy = tmp_path / "slides" / "copy.svs"
    shutil.copy(sample_path, copy)
    slides = [str(sample_path), str(copy)]
    out = tmp_path / "out"
    argv = [*slides, "--out", str(out), *QUICK, "--target-mpp", "1.0"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    stores = {name: open_store(store_path(out, TINY, name, tiling_dir_name(1.0, 224)))
              for name in ("CMU-1-Small-Region", "copy")}  # fmt: skip
    assert all(s.n_patches > 0 for s in stores.values())
    assert [line.split(":")[0] for line in first] == ["done", "done"]

    no_model(monkeypatch)
    monkeypatch.setattr(embed_job, "_ENCODERS", {})  # a fresh process has no model either
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"skipped (already done): {path} -> {store.path} ({store.n_patches} patches)"
        for path, store in zip(slides, stores.values())
    ], captured.err
    assert "2 of 2 slides embedded" in captured.err


def test_interrupted_run_exits_130_and_resumes_to_the_same_features(tmp_path, sample_path,
                                                                    monkeypatch, capsys):
    import napari_gpfm.embeddings.run as run

    (slide,) = links(tmp_path, sample_path, ["r.svs"])
    opts = [*QUICK, "--target-mpp", "1.0", "--batch-size", "2"]
    forward, calls = run.BatchForward.submit, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(run.BatchForward, "submit", interrupted)
    out = tmp_path / "out"
    assert main([slide, "--out", str(out), *opts]) == 130
    assert "interrupted" in capsys.readouterr().err
    final = store_path(out, TINY, "r", tiling_dir_name(1.0, 224))
    assert not final.exists() and final.with_name(final.name + ".partial").exists()

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(run.BatchForward, "submit", counted)
    calls.clear()
    assert main([slide, "--out", str(out), *opts]) == 0
    assert capsys.readouterr().out.startswith(f"done: {slide} -> {final}")
    resumed_batches = len(calls)
    calls.clear()
    assert main([slide, "--out", str(tmp_path / "whole"), *opts]) == 0
    assert resumed_batches == len(calls) - 2  # the two finished batches were kept
    whole = open_store(store_path(tmp_path / "whole", TINY, "r", tiling_dir_name(1.0, 224)))
    resumed = open_store(final)
    np.testing.assert_array_equal(resumed.coords, whole.coords)
    np.testing.assert_array_equal(resumed.features, whole.features)


def test_one_bad_slide_reported_others_done_nonzero_exit(tmp_path, sample_path, capsys):
    good = links(tmp_path, sample_path, ["first.svs", "third.svs"])
    bad = tmp_path / "slides" / "broken.svs"
    bad.write_bytes(b"this is not a slide")
    out = tmp_path / "out"
    rc = main([good[0], str(bad), good[1], "--out", str(out), *QUICK, "--target-mpp", "1.0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED" in err and "broken.svs" in err
    for name in ("first", "third"):
        store = open_store(store_path(out, TINY, name, tiling_dir_name(1.0, 224)))
        assert store.n_patches > 0
    assert not list(out.rglob("broken*"))
    # a second call skips the finished ones and still reports the broken one
    rc = main([good[0], str(bad), "--out", str(out), *QUICK, "--target-mpp", "1.0"])
    captured = capsys.readouterr()
    assert rc == 1 and "skipped" in captured.out


@pytest.mark.parametrize(("rank", "expected"), [(0, {"s0", "s2"}), (1, {"s1"})])
def test_torchrun_rank_takes_its_share(tmp_path, sample_path, monkeypatch, rank, expected):
    slides = links(tmp_path, sample_path, ["s0.svs", "s1.svs", "s2.svs"])
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    rc = main([*slides, "--out", str(out), *QUICK, "--target-mpp", "2.0", "--min-tissue", "0.3"])
    assert rc == 0
    made = {p.stem for p in (out / "2mpp_224px_0px_overlap" / f"features_{TINY}").glob("*.h5")}
    assert made == expected


def test_magnification_and_patch_options_reach_the_recipe(tmp_path, sample_path):
    (slide,) = links(tmp_path, sample_path, ["m.svs"])
    rc = main([slide, "--out", str(tmp_path), *QUICK, "--magnification", "5",
               "--patch-size", "128", "--overlap", "32", "--min-tissue", "0.25"])
    assert rc == 0
    r = open_store(store_path(tmp_path, TINY, "m", "2mpp_128px_32px_overlap")).recipe
    assert r.target_mpp == 2.0 and r.patch_size == 128 and r.overlap == 32
    assert r.min_tissue == 0.25 and r.patch_size_level0 == round(128 * 2.0 / 0.499)


def test_missing_mpp_needs_flag(tmp_path, nompp_tiff, capsys):
    out = tmp_path / "out"
    assert main([str(nompp_tiff), "--out", str(out), *QUICK]) == 1
    assert "--mpp" in capsys.readouterr().err
    assert main([str(nompp_tiff), "--out", str(out), *QUICK, "--mpp", "0.5"]) == 0
    (path,) = out.rglob("*.h5")
    assert path == store_path(out, TINY, "nompp", tiling_dir_name(0.5, 224, 0))
    assert open_store(path).recipe.mpp_source == "user"


def test_missing_weights_is_a_setup_error(tmp_path, sample_path, capsys):
    rc = main([str(sample_path), "--out", str(tmp_path), "--model", TINY])
    assert rc == 2
    assert TINY in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.h5*"))
    rc = main([str(sample_path), "--out", str(tmp_path), "--model", TINY,
               "--weights", str(tmp_path / "absent.pth")])
    assert rc == 2
    assert "absent.pth" in capsys.readouterr().err


def test_explicit_weights_are_part_of_the_recipe_and_a_damaged_file_stops_all(
        tmp_path, sample_path, monkeypatch, capsys):  # fmt: skip
    import torch

    from napari_gpfm.encoders import build_model, get_card, sha256_file

    torch.manual_seed(1)
    weights = tmp_path / "tiny.pth"
    torch.save(build_model(get_card(TINY)).state_dict(), weights)
    (slide,) = links(tmp_path, sample_path, ["w.svs"])
    out = tmp_path / "out"
    opts = [*QUICK, "--target-mpp", "2.0", "--weights", str(weights)]
    assert main([slide, "--out", str(out), *opts]) == 0
    (path,) = out.rglob("*.h5")
    assert open_store(path).recipe.weights_sha256 == sha256_file(weights)
    capsys.readouterr()
    with monkeypatch.context() as m:  # the same file again: found without building the model
        no_model(m)
        assert main([slide, "--out", str(out), *opts]) == 0
        assert capsys.readouterr().out.startswith("skipped (already done)")

    other = tmp_path / "other.pth"
    other.write_bytes(b"not a checkpoint")  # another recipe, and a model that cannot be built
    rc = main([slide, str(sample_path), "--out", str(tmp_path / "fresh"), *QUICK,
               "--target-mpp", "2.0", "--weights", str(other)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "other.pth" in err and "FAILED" not in err
    assert err.splitlines()[-1].startswith("error: ")
    assert not list((tmp_path / "fresh").rglob("*.h5*"))


def test_the_docks_still_get_an_index_and_the_cli_none(tmp_path, sample_path):
    from jobs_helpers import drive

    from napari_gpfm.jobs.embed import EmbedRequest, embed_or_load
    from napari_gpfm.slide import open_slide
    from napari_gpfm.tiles import GridSpec, TissueParams

    slide = open_slide(sample_path)
    req = dict(slide=slide, model=TINY, spec=GridSpec(target_mpp=2.0, patch_size=224),
               tissue_params=TissueParams(), out_dir=tmp_path, device="cpu",
               allow_random=True, num_workers=0)  # fmt: skip
    try:
        records, made = drive(embed_or_load(EmbedRequest(**req, index=False)))
        assert made.index is None and not made.loaded
        assert "indexing" not in {r.stage for r in records}
        _, loaded = drive(embed_or_load(EmbedRequest(**req)))
    finally:
        slide.close()
    assert loaded.loaded and loaded.index is not None
    assert loaded.index.n == made.store.n_patches


def test_no_tissue_mask_embeds_every_patch_of_a_blank_crop(tmp_path, monkeypatch):
    """A crop tissue detection calls empty: --no-tissue-mask embeds every patch; the default
    refuses it with advice naming the option."""
    import numpy as np
    import tifffile

    from napari_gpfm.cli import main
    from napari_gpfm.embeddings import open_store

    crop = tmp_path / "crop.tif"
    img = np.full((512, 512, 3), 250, np.uint8)
    tifffile.imwrite(crop, img, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    args = ["embed", str(crop), "--out", str(tmp_path / "out"), "--model", TINY,
            "--allow-random-weights", "--num-workers", "0"]
    assert main(args) == 1
    assert main([*args, "--no-tissue-mask"]) == 0
    (store,) = (tmp_path / "out").glob("*/features_*/crop.h5")
    s = open_store(store)
    assert s.n_patches == (512 // s.patch_size_level0) ** 2


def test_max_patches_refuses_an_oversized_grid_and_names_the_flag(tmp_path, sample_svs, capsys):
    """A grid larger than --max-patches is refused before any model work; the next slide runs."""
    from napari_gpfm.cli import main

    out = tmp_path / "out"
    args = ["embed", str(sample_svs), "--out", str(out), "--model", TINY,
            "--allow-random-weights", "--num-workers", "0"]
    assert main([*args, "--max-patches", "5"]) == 1
    assert "--max-patches" in capsys.readouterr().err
    assert not list(out.glob("*/features_*/*.h5"))
    assert main([*args, "--max-patches", "0"]) == 0
    assert len(list(out.glob("*/features_*/*.h5"))) == 1


def test_precision_flag_is_recorded_and_another_precision_is_refused(tmp_path, sample_path,
                                                                    capsys):  # fmt: skip
    (slide,) = links(tmp_path, sample_path, ["p.svs"])
    out = tmp_path / "out"
    opts = [*QUICK, "--target-mpp", "1.0", "--batch-size", "auto"]
    assert main([slide, "--out", str(out), *opts, "--precision", "bf16"]) == 0
    final = store_path(out, TINY, "p", tiling_dir_name(1.0, 224))
    assert open_store(final).precision == "bf16"
    capsys.readouterr()
    assert main([slide, "--out", str(out), *opts]) == 1  # auto: fp32 on this CPU
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("FAILED: "))
    assert str(final) in line and "computed in bf16 but this run asks for fp32" in line, line
    assert main([slide, "--out", str(out), *opts, "--precision", "bf16"]) == 0  # same: skipped
    assert "skipped (already done)" in capsys.readouterr().out


def test_bad_batch_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["s.svs", "--out", "o", "--batch-size", "0"])
    assert e.value.code == 2 and "positive integer or 'auto'" in capsys.readouterr().err


def test_dock_batches_small_on_cpu_and_from_free_memory_on_cuda():
    from types import SimpleNamespace

    from napari_gpfm.jobs.embed import batch_size_for

    assert batch_size_for(SimpleNamespace(embed_dim=1024), "cpu") == 4
    assert batch_size_for(SimpleNamespace(embed_dim=384), "cpu") == 16
    assert batch_size_for(SimpleNamespace(embed_dim=1024), "cuda:1") == "auto"
