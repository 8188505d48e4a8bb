"""`napari-gpfm embed`: many slides, failures reported and survived, torchrun sharding."""

from __future__ import annotations

import argparse

import pytest

from napari_gpfm.embeddings import open_store, store_path, tiling_dir_name
from napari_gpfm.embeddings._cli import main, register

QUICK = ["--model", "tiny-test", "--allow-random-weights", "--num-workers", "0",
         "--batch-size", "32"]


def links(tmp_path, sample_path, names):
    d = tmp_path / "slides"
    d.mkdir(exist_ok=True)
    out = []
    for n in names:
        p = d / n
        p.symlink_to(sample_path)
        out.append(str(p))
    return out


def test_register_adds_embed_subcommand():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["embed", "a.svs", "b.svs", "--out", "o", "--magnification", "40"])
    assert args.slides == ["a.svs", "b.svs"] and callable(args.func)
    with pytest.raises(SystemExit):  # --target-mpp and --magnification exclude each other
        parser.parse_args(["embed", "a.svs", "--out", "o", "--target-mpp", "0.5",
                           "--magnification", "20"])


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
        store = open_store(store_path(out, "tiny-test", name, tiling_dir_name(1.0, 224)))
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
    made = {p.stem for p in (out / "2mpp_224px_0px_overlap" / "features_tiny-test").glob("*.h5")}
    assert made == expected


def test_magnification_and_patch_options_reach_the_recipe(tmp_path, sample_path):
    (slide,) = links(tmp_path, sample_path, ["m.svs"])
    rc = main([slide, "--out", str(tmp_path), *QUICK, "--magnification", "5",
               "--patch-size", "128", "--overlap", "32", "--min-tissue", "0.25"])
    assert rc == 0
    r = open_store(store_path(tmp_path, "tiny-test", "m", "2mpp_128px_32px_overlap")).recipe
    assert r.target_mpp == 2.0 and r.patch_size == 128 and r.overlap == 32
    assert r.min_tissue == 0.25 and r.patch_size_level0 == round(128 * 2.0 / 0.499)


def test_missing_mpp_needs_flag(tmp_path, nompp_tiff, capsys):
    out = tmp_path / "out"
    assert main([str(nompp_tiff), "--out", str(out), *QUICK]) == 1
    assert "--mpp" in capsys.readouterr().err
    assert main([str(nompp_tiff), "--out", str(out), *QUICK, "--mpp", "0.5"]) == 0
    (path,) = out.rglob("*.h5")
    assert path == store_path(out, "tiny-test", "nompp", tiling_dir_name(0.5, 224, 0))
    assert open_store(path).recipe.mpp_source == "user"


def test_missing_weights_is_a_setup_error(tmp_path, sample_path, capsys):
    rc = main([str(sample_path), "--out", str(tmp_path), "--model", "tiny-test"])
    assert rc == 2
    assert "tiny-test" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.h5*"))
