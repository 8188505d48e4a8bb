"""Model cards: the bundled cards, validation messages, YAML round trip, weights resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import card_dict, write_card

from napari_gpfm.encoders import ModelCard, ModelCardError, build_model, get_card


def test_bundled_cards_describe_gpfm_and_its_experts():
    gpfm = get_card("gpfm")
    assert gpfm.is_gpfm
    assert gpfm.architecture.timm_name == "vit_large_patch14_dinov2"
    assert gpfm.architecture.kwargs == {"img_size": 224, "init_values": 1e-5, "num_classes": 0}
    assert (gpfm.embed_dim, gpfm.input.size, gpfm.checkpoint_layout) == (1024, 224, "gpfm")
    assert gpfm.input.mean == (0.485, 0.456, 0.406) and gpfm.input.std == (0.229, 0.224, 0.225)
    assert gpfm.weights.env == "GPFM_WEIGHTS"
    assert gpfm.weights.hf_hub.repo_id == "majiabo/GPFM"
    assert gpfm.license == "CC-BY-NC-ND-4.0"
    experts = {name: get_card(name) for name in ("uni", "phikon", "conch")}
    assert {n: (c.embed_dim, c.is_gpfm, c.checkpoint_layout) for n, c in experts.items()} == {
        "uni": (1024, False, "timm"), "phikon": (768, False, "phikon"),
        "conch": (512, False, "conch")}
    assert experts["uni"].gated and experts["conch"].gated and not experts["phikon"].gated


def test_card_round_trips_through_yaml(tmp_path: Path):
    card = ModelCard.from_yaml(write_card(tmp_path, card_dict(bundled_default=True)))
    again = ModelCard.from_yaml(card.to_yaml(tmp_path / "out" / "copy.yaml"))
    assert again == card
    assert again.path == tmp_path / "out" / "copy.yaml"
    conch = get_card("conch")  # optional pool / norm settings survive too
    assert ModelCard.from_yaml(conch.to_yaml(tmp_path / "conch.yaml")) == conch


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"colour": "red"}, "unknown key(s) 'colour'"),
        ({"embed_dim": None}, "missing required key 'embed_dim'"),
        ({"embed_dim": "big"}, "'embed_dim' must be an integer, got 'big'"),
        ({"is_gpfm": "yes"}, "'is_gpfm' must be true or false"),
        ({"checkpoint_layout": "onnx"}, "'checkpoint_layout' must be one of"),
        ({"name": "My Model"}, "'name' must be lowercase"),
        ({"input": {"size": 56, "mean": [0.5, 0.5], "std": [1, 1, 1]}},
         "'input.mean' must be a list of 3"),
        ({"architecture": {"timm_name": "vit", "kwarg": {}}},
         "unknown key(s) 'architecture.kwarg'"),
        ({"weights": {"sha256": "abc"}}, "'weights.sha256' must be 64 hexadecimal digits"),
        ({"architecture": {"timm_name": "vit", "norm_eps": "1e-6"}}, "write 1.0e-5"),
    ],
)
def test_bad_card_error_names_file_and_problem(tmp_path: Path, change: dict, expected: str):
    path = write_card(tmp_path, card_dict(**change), filename="broken.yaml")
    with pytest.raises(ModelCardError) as info:
        ModelCard.from_yaml(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_unparsable_yaml_names_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ModelCardError, match="not valid YAML") as info:
        ModelCard.from_yaml(path)
    assert str(path) in str(info.value)


def test_weights_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    default = tmp_path / "default.pth"
    from_env = tmp_path / "env.pth"
    data = card_dict()
    data["weights"] = {**data["weights"], "file": "next_to_card.pth", "default_path": str(default)}
    card = ModelCard.from_yaml(write_card(tmp_path / "cards", data))
    beside = tmp_path / "cards" / "next_to_card.pth"
    monkeypatch.setenv("TINY_WEIGHTS", str(from_env))
    assert card.resolve_weights() is None
    assert not card.status().found and card.status().state == "missing"
    assert card.status().path == beside  # where it should be put

    default.write_bytes(b"d")
    assert card.resolve_weights() == default
    from_env.write_bytes(b"e")
    assert card.resolve_weights() == from_env
    beside.write_bytes(b"f")
    assert card.resolve_weights() == beside
    assert card.resolve_weights(tmp_path / "explicit.pth") == tmp_path / "explicit.pth"
    status = card.status()
    assert (status.found, status.path, status.source, status.license) == (
        True, beside, "weights.file", "test-licence-1.0")


def test_missing_weights_message_says_what_to_get_and_where():
    text = get_card("gpfm").missing_weights_message()
    default = str(Path("~/.cache/napari-gpfm/weights/GPFM.pth").expanduser())
    for needle in ("GPFM.pth", "GPFM_WEIGHTS", default, "huggingface.co/majiabo/GPFM",
                   "napari-gpfm models --download gpfm", "CC-BY-NC-ND-4.0",
                   "$GPFM_WEIGHTS: not set"):
        assert needle in text
    assert "gated" not in text.lower()
    uni_text = get_card("uni").missing_weights_message()
    assert "request it at https://huggingface.co/MahmoodLab/UNI" in uni_text


def test_build_model_checks_card_against_architecture(tmp_path: Path):
    wrong_dim = ModelCard.from_yaml(write_card(tmp_path, card_dict(embed_dim=64)))
    expected = "'embed_dim' is 64 but the architecture outputs 48"
    with pytest.raises(ModelCardError, match=expected) as info:
        build_model(wrong_dim)
    assert str(wrong_dim.path) in str(info.value)
    unknown = card_dict(name="nope", architecture={"timm_name": "vit_does_not_exist"})
    with pytest.raises(ModelCardError, match="cannot build 'vit_does_not_exist'"):
        build_model(ModelCard.from_yaml(write_card(tmp_path, unknown)))
