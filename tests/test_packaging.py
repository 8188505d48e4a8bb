"""The plugin as the hub installs it: manifest, wheel contents, npe2 validation on the wheel."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_manifest_command_resolves():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    assert manifest.name == "napari-gpfm"
    for command in manifest.contributions.commands:
        module, attr = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), command.id


def test_package_manifest_is_the_root_file():
    assert (ROOT / "napari_gpfm" / "napari.yaml").resolve() == (ROOT / "napari.yaml").resolve()


def test_package_import_pulls_in_neither_torch_nor_qt():
    code = "import sys, napari_gpfm; print(any(m in sys.modules for m in ('torch', 'qtpy', 'PyQt6')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (path,) = out.glob("napari_gpfm-*.whl")
    return path


def test_wheel_ships_manifest_models_and_sample(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("napari_gpfm/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "napari_gpfm/sample_data/CMU-1-Small-Region.svs" in names
    assert "napari_gpfm/sample_data/LICENSE-CC0-1.0.txt" in names
    cards = {Path(n).name for n in names if n.startswith("napari_gpfm/models/") and n.endswith(".yaml")}
    assert {Path(p).name for p in (ROOT / "models").glob("*.yaml")} <= cards
    assert "napari-gpfm = napari_gpfm:napari.yaml" in entry_points
    assert "napari-gpfm = napari_gpfm.cli:main" in entry_points


def test_wheel_ships_no_test_or_benchmark_helpers(wheel):
    """The synthetic-pyramid writer serves only tests and bench/: it lives in tests/."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert [n for n in names if Path(n).stem in ("synthetic", "synthetic_slides")] == []
    assert [n for n in names if n.split("/")[0] in ("tests", "bench")] == []
    assert (ROOT / "tests" / "synthetic_slides.py").is_file()


def test_npe2_validate_passes_on_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import npe2, napari_gpfm, sys; from npe2.cli import main; print(napari_gpfm.__file__, file=sys.stderr);"
        "sys.argv=['npe2','validate','napari-gpfm']; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert str(target) in out.stderr  # it validated the wheel's copy, not the source tree
    assert "valid" in out.stdout.lower()
    manifest = yaml.safe_load((target / "napari_gpfm" / "napari.yaml").read_text())
    assert manifest["name"] == "napari-gpfm"


def test_architecture_contracts_hold():
    """Qt only in _qt, no napari in the core, one-way data flow (import-linter, pyproject.toml)."""
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" not in out.stdout.lower() or "0 broken" in out.stdout.lower()
