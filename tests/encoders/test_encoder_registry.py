"""Registry: bundled and user cards, unknown names, the bundled dir, the default model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import card_dict, write_card

import napari_gpfm
from napari_gpfm.encoders import (
    EncoderError,
    ModelCardError,
    UnknownModelError,
    WeightsNotFoundError,
    bundled_models_dir,
    default_model_name,
    get_card,
    list_cards,
    user_models_dir,
)
from napari_gpfm.encoders import registry
from napari_gpfm.encoders.registry import ModelCardWarning

REPO_MODELS = Path(napari_gpfm.__file__).resolve().parents[1] / "models"


def test_lists_bundled_and_user_cards(isolated_env: Path):
    write_card(isolated_env, card_dict("student", is_gpfm=False))
    cards = {card.name: card for card in list_cards()}
    assert {"gpfm", "uni", "phikon", "conch", "student"} <= set(cards)
    assert cards["gpfm"].path.parent == bundled_models_dir() == REPO_MODELS
    assert cards["student"].path == isolated_env / "student.yaml"
    assert user_models_dir() == isolated_env


def test_user_models_dir_defaults_under_home(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("NAPARI_GPFM_MODELS_DIR")
    assert user_models_dir() == Path("~/.local/share/napari-gpfm/models").expanduser()


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as info:
        get_card("gpfn")
    message = str(info.value)
    assert message.startswith("unknown model 'gpfn'")
    for name in ("conch", "gpfm", "phikon", "uni"):
        assert name in message


def test_user_card_replaces_bundled_one(isolated_env: Path):
    write_card(isolated_env, card_dict("uni", license="my-copy"))
    assert get_card("uni").license == "my-copy"


def test_bad_user_card_is_skipped_with_warning_naming_it(isolated_env: Path):
    bad = write_card(isolated_env, card_dict("broken", embed_dim="wide"))
    with pytest.warns(ModelCardWarning, match=str(bad)):
        names = [card.name for card in list_cards()]
    assert "broken" not in names and "gpfm" in names


def test_duplicate_names_in_one_dir_are_an_error(isolated_env: Path):
    first = write_card(isolated_env, card_dict("twin"), filename="a.yaml")
    second = write_card(isolated_env, card_dict("twin"), filename="b.yaml")
    with pytest.raises(ModelCardError) as info:
        list_cards()
    assert str(first) in str(info.value) and str(second) in str(info.value)


def test_bundled_dir_prefers_package_then_repo_root(tmp_path: Path, monkeypatch):
    package = tmp_path / "site" / "napari_gpfm"
    package.mkdir(parents=True)
    monkeypatch.setattr(registry, "_PACKAGE_DIR", package)
    with pytest.raises(EncoderError, match="bundled model cards are missing") as info:
        bundled_models_dir()
    assert str(package / "models") in str(info.value)
    (tmp_path / "site" / "models").mkdir()
    assert bundled_models_dir() == tmp_path / "site" / "models"  # source checkout
    (package / "models").mkdir()
    assert bundled_models_dir() == package / "models"  # installed wheel wins


def test_default_is_gpfm_when_its_weights_are_found(tmp_path: Path, monkeypatch):
    weights = tmp_path / "GPFM.pth"
    weights.write_bytes(b"not read by the registry")
    monkeypatch.setenv("GPFM_WEIGHTS", str(weights))
    assert default_model_name() == "gpfm"


def test_default_finds_gpfm_at_its_default_path():
    default = Path("~/.cache/napari-gpfm/weights/GPFM.pth").expanduser()  # under the test $HOME
    default.parent.mkdir(parents=True)
    default.write_bytes(b"x")
    assert default_model_name() == "gpfm"


def test_default_falls_back_to_bundled_default_student(isolated_env: Path, tmp_path: Path):
    for name, is_gpfm in (("zeta", True), ("alpha", False), ("beta", True)):
        data = card_dict(name, is_gpfm=is_gpfm, bundled_default=True)
        data["weights"] = {**data["weights"], "file": f"{name}.safetensors"}
        write_card(isolated_env, data)
    write_card(isolated_env, card_dict("unmarked"))  # no bundled_default: never the default
    # marked user cards without weights are skipped: the bundled demo student is the default
    assert default_model_name() == "gpfm-demo-student-vit-ti14"
    (isolated_env / "unmarked.safetensors").write_bytes(b"x")
    (isolated_env / "alpha.safetensors").write_bytes(b"x")
    assert default_model_name() == "alpha"
    (isolated_env / "zeta.safetensors").write_bytes(b"x")
    (isolated_env / "beta.safetensors").write_bytes(b"x")
    assert default_model_name() == "beta"  # GPFM-trained first, then by name


def test_no_default_explains_how_to_get_gpfm(tmp_path: Path, monkeypatch):
    """Without GPFM weights and without the bundled student (an incomplete install)."""
    from napari_gpfm.encoders import registry

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    for name in ("gpfm", "uni", "phikon", "conch"):
        (bundled / f"{name}.yaml").write_text((registry.bundled_models_dir() / f"{name}.yaml").read_text())
    monkeypatch.setattr(registry, "bundled_models_dir", lambda: bundled)
    with pytest.raises(WeightsNotFoundError) as info:
        default_model_name()
    message = str(info.value)
    assert message.startswith("GPFM weights are missing")
    for needle in ("GPFM.pth", "GPFM_WEIGHTS",
                   str(Path("~/.cache/napari-gpfm/weights/GPFM.pth").expanduser()),
                   "napari-gpfm models --download gpfm"):
        assert needle in message


def test_cards_are_parsed_again_only_when_their_file_changes(isolated_env: Path, monkeypatch):
    """Docks list the cards on the main thread whenever a model appears: an unchanged file is
    not parsed again, an edited one is (its new values seen at once)."""
    import os

    from napari_gpfm.encoders.card import ModelCard

    path = write_card(isolated_env, card_dict("student", is_gpfm=False, license="first"))
    assert get_card("student").license == "first"
    parsed: list[Path] = []
    real = ModelCard.from_yaml.__func__

    def spy(cls, p, *a, **k):
        parsed.append(Path(p))
        return real(cls, p, *a, **k)

    monkeypatch.setattr(ModelCard, "from_yaml", classmethod(spy))
    list_cards()
    assert parsed == []  # nothing changed: no card parsed again
    st = path.stat()
    write_card(isolated_env, card_dict("student", is_gpfm=False, license="second-licence"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert get_card("student").license == "second-licence"
    assert parsed == [path]
