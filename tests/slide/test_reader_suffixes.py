"""The slide file suffixes are kept once (``slide.open.READER_SUFFIXES``); the hand-written
napari.yaml and the distillation's slide folders agree with that list."""

from __future__ import annotations

from pathlib import Path

import yaml

from napari_gpfm.distill.sources import expand_slide_paths
from napari_gpfm.slide.open import READER_SUFFIXES, slide_kind

ROOT = Path(__file__).resolve().parents[2]


def manifest_patterns() -> list[str]:
    manifest = yaml.safe_load((ROOT / "napari.yaml").read_text(encoding="utf-8"))
    (reader,) = manifest["contributions"]["readers"]
    return reader["filename_patterns"]


def test_manifest_patterns_are_exactly_the_reader_suffixes():
    patterns = manifest_patterns()
    assert len(patterns) == len(set(patterns)), "napari.yaml lists a pattern twice"
    from_manifest = {p.removeprefix("*") for p in patterns}
    assert all(p.startswith("*.") for p in patterns), patterns
    assert from_manifest - set(READER_SUFFIXES) == set(), "in napari.yaml, not in READER_SUFFIXES"
    assert set(READER_SUFFIXES) - from_manifest == set(), "in READER_SUFFIXES, not in napari.yaml"


def test_every_reader_suffix_names_a_slide_kind():
    for suffix in READER_SUFFIXES:
        assert suffix == suffix.lower() and suffix.count(".") == 1, suffix
        assert slide_kind(f"/nowhere/slide{suffix}") is not None, suffix


def test_distill_slide_folders_take_every_reader_suffix(tmp_path: Path):
    names = [f"slide{i}{suffix}" for i, suffix in enumerate(READER_SUFFIXES)]
    for name in [*names, "notes.txt", "tile.png"]:
        (tmp_path / name).write_bytes(b"x")
    found = [p.name for p in expand_slide_paths([tmp_path])]
    assert sorted(found) == sorted(names)
    assert any(n.endswith(".qptiff") for n in found)  # distill's own list used to miss it
