"""A card's ``checkpoint_layout`` chooses the converter; the layout detected in the file only
checks it. Every layout has a converter and a tiny checkpoint written here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import card_dict, randomized
from layout_files import LAYOUT_FILES, expert_card
from safetensors.torch import save_file

from napari_gpfm.encoders import ModelCard, ModelCardError, build_model, get_card, list_cards, load_encoder
from napari_gpfm.encoders.card import LAYOUTS
from napari_gpfm.encoders.checkpoint import CONVERTERS
from napari_gpfm.encoders.errors import LayoutMismatchError

#: The files each card layout takes besides its own: GPFM's weights also come as flat timm keys.
ALSO_ACCEPTED = {("gpfm", "timm")}


def test_every_card_layout_has_a_converter_and_a_test_file():
    assert set(LAYOUTS) == set(CONVERTERS) == set(LAYOUT_FILES)
    for card in list_cards():  # bundled and user cards, as timm's tests loop over list_models
        assert card.checkpoint_layout in CONVERTERS, card.name


def test_a_layout_without_converter_is_refused_by_the_card():
    with pytest.raises(ModelCardError, match="'checkpoint_layout' must be one of gpfm, timm"):
        ModelCard.from_dict(card_dict("old-uni", checkpoint_layout="uni"))


def _card_and_reference(models_dir: Path, layout: str, seed: int = 4):
    spec = LAYOUT_FILES[layout]
    expert_card(models_dir, f"tiny-{layout}", layout, spec.architecture, embed_dim=spec.embed_dim)
    card = get_card(f"tiny-{layout}")
    return card, randomized(build_model(card), seed=seed)


def _save(path: Path, ckpt: dict) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.clone().contiguous() for k, v in ckpt.items()}, path)
    else:
        torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_loads_its_own_checkpoint_exactly(isolated_env, tmp_path, layout, suffix):
    card, reference = _card_and_reference(isolated_env, layout)
    spec = LAYOUT_FILES[layout]
    make = spec.flat if suffix == ".safetensors" else spec.make
    path = _save(tmp_path / f"{layout}{suffix}", make(reference.state_dict()))
    loaded = load_encoder(card, weights=path).model.state_dict()
    expected = reference.state_dict()
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


@pytest.mark.parametrize("file_layout", LAYOUTS)
@pytest.mark.parametrize("card_layout", LAYOUTS)
def test_card_layout_decides_and_a_mismatch_names_file_and_layouts(
        isolated_env, tmp_path, card_layout, file_layout):
    card, _ = _card_and_reference(isolated_env, card_layout)
    _, other = _card_and_reference(isolated_env, file_layout, seed=5)
    path = _save(tmp_path / f"{file_layout}.pth", LAYOUT_FILES[file_layout].make(other.state_dict()))
    if file_layout == card_layout or (card_layout, file_layout) in ALSO_ACCEPTED:
        loaded = load_encoder(card, weights=path).model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())
        return
    with pytest.raises(LayoutMismatchError) as info:
        load_encoder(card, weights=path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert f"checkpoint_layout: {card_layout}," in message
    assert f"holds a '{file_layout}' checkpoint" in message
    assert f"model 'tiny-{card_layout}'" in message
    assert (info.value.expected, info.value.detected) == (card_layout, file_layout)
