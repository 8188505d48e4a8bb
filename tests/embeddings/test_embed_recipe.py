"""Recipe key: stable, sensitive to what changes features, blind to software versions."""

from __future__ import annotations

import dataclasses

from napari_gpfm.embeddings import EmbeddingRecipe
from napari_gpfm.tiles import TissueParams


def recipe(**kw) -> EmbeddingRecipe:
    base = dict(model="gpfm", weights_sha256="ab" * 32, mpp=0.499, mpp_source="file",
                target_mpp=0.5, patch_size=224, input_size=224, patch_size_level0=224, overlap=0,
                min_tissue=0.5, tissue_params=TissueParams().to_dict(),
                versions={"torch": "2.0", "napari_gpfm": "0.1.0"})
    base.update(kw)
    return EmbeddingRecipe(**base)


def test_key_is_stable_and_roundtrips_json():
    r = recipe()
    assert r.key() == recipe().key()
    assert len(r.key()) == 16
    assert EmbeddingRecipe.from_json(r.to_json()) == r
    assert EmbeddingRecipe.from_json(r.to_json()).key() == r.key()


def test_versions_and_mpp_source_do_not_change_key():
    assert recipe(versions={"torch": "9.9"}).key() == recipe().key()
    assert recipe(mpp_source="user").key() == recipe().key()
    assert recipe(mpp=0.4990000001).key() == recipe().key()  # float noise


def test_every_feature_relevant_field_changes_key():
    changes = dict(model="uni", weights_sha256="cd" * 32, mpp=0.25, target_mpp=0.25,
                   patch_size=512, input_size=256, patch_size_level0=448, overlap=32,
                   min_tissue=0.25, tissue_params=TissueParams(min_saturation=0.1).to_dict())
    for field, value in changes.items():
        other = recipe(**{field: value})
        assert other.key() != recipe().key(), field
        assert list(recipe().diff(other)) == [field]


def test_fields_list_matches_dataclass():
    from napari_gpfm.embeddings import KEY_FIELDS

    names = {f.name for f in dataclasses.fields(EmbeddingRecipe)}
    assert set(KEY_FIELDS) <= names
    assert names - set(KEY_FIELDS) == {"versions", "mpp_source", "device"}


def test_precision_is_in_the_key_and_device_is_not():
    fp32, fp16 = recipe(precision="fp32", device="cpu"), recipe(precision="fp16", device="cpu")
    assert fp32.key() != fp16.key()
    assert list(fp32.diff(fp16)) == ["precision"]
    assert recipe(precision="fp32", device="cuda (NVIDIA H200)").key() == fp32.key()
    assert EmbeddingRecipe.from_json(fp16.to_json()) == fp16


def test_recipe_without_precision_keeps_its_old_key():
    """Stores made before precision was recorded keep the key they were written with (the
    value below is the key of this recipe before the field existed)."""
    old = recipe(tissue_params={"method": "otsu", "thumb_max_side": 2048})
    assert old.precision is None
    assert old.key() == "1f031c04d163c27c"  # computed by napari-gpfm 0.2's recipe.py
    assert old.key() != dataclasses.replace(old, precision="fp32").key()


def test_legacy_precision_only_from_a_recorded_device():
    from napari_gpfm.embeddings.recipe import legacy_precision

    assert legacy_precision("cpu") == "fp32"
    assert legacy_precision("cuda (NVIDIA A100)") == "bf16"
    assert legacy_precision("cuda:1") == "bf16"
    assert legacy_precision(None) is None
    assert recipe(device="cpu").with_legacy_precision().precision == "fp32"
    assert recipe().with_legacy_precision().precision is None
    assert recipe(precision="fp16", device="cpu").with_legacy_precision().precision == "fp16"
