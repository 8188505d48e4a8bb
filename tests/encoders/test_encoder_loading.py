"""load_encoder end to end on a tiny DINOv2-style ViT: layouts, preprocessing, records, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import card_dict, gpfm_release, write_card
from safetensors.torch import save_file

from napari_gpfm.encoders import (
    CheckpointError,
    ModelCard,
    WeightsDownloadError,
    WeightsNotFoundError,
    download_weights,
    get_card,
    load_encoder,
    sha256_file,
)
from napari_gpfm.encoders import download as download_module


@pytest.fixture
def saved_layouts(tiny_model, tmp_path: Path) -> dict[str, Path]:
    """The reference weights in every layout GPFM ships or users produce."""
    flat = tiny_model.state_dict()
    paths = {name: tmp_path / name for name in
             ("GPFM_release.pth", "flat.pth", "wrapped.pth", "flat.safetensors")}
    torch.save(gpfm_release(flat, chunks=2, global_inner_index=True), paths["GPFM_release.pth"])
    torch.save(flat, paths["flat.pth"])
    torch.save({"state_dict": flat}, paths["wrapped.pth"])
    save_file(flat, paths["flat.safetensors"])
    return paths


def test_every_layout_gives_identical_embeddings(tiny_card, tiny_model, saved_layouts, images):
    expected = tiny_model.forward_features(tiny_model_input(tiny_card, images))[:, 0]
    for path in saved_layouts.values():
        encoder = load_encoder("tiny", weights=path)
        torch.testing.assert_close(encoder.embed(images), expected, rtol=0, atol=0,
                                   msg=lambda m, p=path: f"{p.name}: {m}")
        assert encoder.weights_path == path
        assert encoder.weights_sha256 == sha256_file(path)
        assert not encoder.is_random_init


def tiny_model_input(card: ModelCard, images: torch.Tensor) -> torch.Tensor:
    """Preprocessing written out independently of Encoder.preprocess (images are 56 px)."""
    x = images.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(card.input.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.input.std).view(1, 3, 1, 1)
    return (x - mean) / std


def test_weights_found_through_env_var(tiny_card, saved_layouts, monkeypatch, images):
    monkeypatch.setenv("TINY_WEIGHTS", str(saved_layouts["GPFM_release.pth"]))
    encoder = load_encoder("tiny")
    assert encoder.weights_path == saved_layouts["GPFM_release.pth"]
    assert encoder.embed(images).shape == (2, 48)


def test_tokens_and_shapes(tiny_card, saved_layouts, images):
    encoder = load_encoder(tiny_card, weights=saved_layouts["flat.safetensors"])
    assert (encoder.embed_dim, encoder.token_dim, encoder.input_size) == (48, 48, 56)
    cls, patches = encoder.tokens(encoder.preprocess(images))
    assert patches.shape == (2, (56 // 14) ** 2, 48)
    torch.testing.assert_close(cls, encoder.embed(images))
    assert encoder.to("cpu") is encoder and encoder.device.type == "cpu"


def test_preprocess_resizes_scales_and_normalises(tiny_card):
    encoder = load_encoder(tiny_card, allow_random=True)
    grey = np.full((1, 80, 100, 3), 128, dtype=np.uint8)  # non-square, larger than 56
    x = encoder.preprocess(grey)
    assert x.shape == (1, 3, 56, 56) and x.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(tiny_card.input.mean)) / torch.tensor(tiny_card.input.std)
    torch.testing.assert_close(x[0, :, 28, 28], expected)
    single = encoder.preprocess(grey[0])  # one (H, W, 3) image
    torch.testing.assert_close(single, x)
    with pytest.raises(ValueError, match=r"images shaped \(N, H, W, 3\), got torch.float32"):
        encoder.preprocess(torch.zeros(1, 56, 56, 3))
    with pytest.raises(ValueError, match=r"got torch.uint8 \(1, 3, 56, 56\)"):
        encoder.preprocess(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))


def test_missing_weights_message(tiny_card):
    with pytest.raises(WeightsNotFoundError) as info:
        load_encoder("tiny")
    message = str(info.value)
    default = str(Path("~/.cache/napari-gpfm/weights/tiny.pth").expanduser())
    for needle in ("No weights for model 'tiny'", "tiny.pth", "TINY_WEIGHTS", default,
                   "napari-gpfm models --download tiny", "test-licence-1.0"):
        assert needle in message


def test_explicit_missing_path_is_named(tiny_card, tmp_path: Path):
    with pytest.raises(WeightsNotFoundError) as info:
        load_encoder("tiny", weights=tmp_path / "typo.pth", allow_random=True)
    assert str(info.value) == (f"{tmp_path / 'typo.pth'}: the weights file given for model "
                               "'tiny' does not exist.")


def test_random_init_is_explicit_seeded_and_recorded(tiny_card, images):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = load_encoder("tiny", allow_random=True, seed=4)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    again = load_encoder("tiny", allow_random=True, seed=4)
    other = load_encoder("tiny", allow_random=True, seed=5)
    assert first.weights_sha256 == "random-init-seed-4" and first.weights_path is None
    assert first.is_random_init
    assert torch.equal(first.embed(images), again.embed(images))
    assert not torch.equal(first.embed(images), other.embed(images))


def test_sha256_recorded_in_card_is_verified(isolated_env, saved_layouts):
    good = sha256_file(saved_layouts["flat.pth"])
    for name, digest in (("pinned", good), ("stale", "0" * 64)):
        data = card_dict(name)
        data["weights"] = {**data["weights"], "sha256": digest}
        write_card(isolated_env, data)
    assert load_encoder("pinned", weights=saved_layouts["flat.pth"]).weights_sha256 == good
    with pytest.raises(CheckpointError, match=f"SHA-256 {good} does not match 0000") as info:
        load_encoder("stale", weights=saved_layouts["flat.pth"])
    assert str(saved_layouts["flat.pth"]) in str(info.value)


def test_download_offline_fails_clearly(tiny_card, monkeypatch):
    calls = []

    def offline(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise OSError("network is unreachable")

    monkeypatch.setattr(download_module, "hf_hub_download", offline)
    with pytest.raises(WeightsDownloadError) as info:
        download_weights("tiny")
    message = str(info.value)
    assert calls == [("example/tiny", "tiny.pth")]
    assert "weights of 'tiny' from https://huggingface.co/example/tiny" in message
    assert "network is unreachable" in message and "TINY_WEIGHTS" in message
    target = Path("~/.cache/napari-gpfm/weights/tiny.pth").expanduser()
    assert str(target) in message
    assert not target.exists() and not target.with_name("tiny.pth.part").exists()
    assert "gated" in str(pytest.raises(WeightsDownloadError, download_weights, "uni").value)


def test_download_verifies_checksum_and_moves_into_place(isolated_env, saved_layouts, monkeypatch):
    source = saved_layouts["flat.pth"]

    def fake_hub(repo_id, filename, revision=None, local_dir=None):
        copy = Path(local_dir) / filename
        copy.write_bytes(source.read_bytes())
        return str(copy)

    monkeypatch.setattr(download_module, "hf_hub_download", fake_hub)
    for name, digest in (("pinned", sha256_file(source)), ("stale", "f" * 64)):
        data = card_dict(name)
        data["weights"] = {**data["weights"], "sha256": digest}
        write_card(isolated_env, data)
    path = download_weights("pinned")
    assert path == Path("~/.cache/napari-gpfm/weights/pinned.pth").expanduser()
    assert sha256_file(path) == sha256_file(source)
    assert get_card("pinned").status().found
    with pytest.raises(WeightsDownloadError, match="does not match ffff"):
        download_weights("stale")
    stale = Path("~/.cache/napari-gpfm/weights/stale.pth").expanduser()
    assert not stale.exists() and not stale.with_name("stale.pth.part").exists()


def test_download_from_url_to_chosen_destination(isolated_env, saved_layouts, tmp_path: Path):
    data = card_dict("by-url")
    data["weights"] = {**data["weights"], "hf_hub": None,
                       "url": saved_layouts["flat.pth"].as_uri()}  # file:// needs no network
    write_card(isolated_env, data)
    dest = tmp_path / "chosen" / "weights.pth"
    assert download_weights("by-url", dest=dest) == dest
    assert sha256_file(dest) == sha256_file(saved_layouts["flat.pth"])
    assert download_weights("by-url", dest=dest) == dest  # present: kept, not fetched again
    data = card_dict("nowhere")
    data["weights"] = {**data["weights"], "hf_hub": None}
    write_card(isolated_env, data)
    with pytest.raises(WeightsDownloadError, match="model 'nowhere' has no download source"):
        download_weights("nowhere")
