"""``napari-gpfm models``: the table, JSON output and download errors."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from conftest import card_dict, write_card

from napari_gpfm.encoders import _cli
from napari_gpfm.encoders import download as download_module


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="napari-gpfm")
    _cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_table_lists_every_card_with_status(isolated_env, tmp_path: Path, monkeypatch, capsys):
    weights = tmp_path / "GPFM.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv("GPFM_WEIGHTS", str(weights))
    write_card(isolated_env, card_dict("student", is_gpfm=False))
    assert run(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "GPFM", "DIM", "WEIGHTS", "LICENCE", "GATED", "PATH"]
    rows = {line.split()[0]: line for line in lines[1:7]}
    assert set(rows) == {"conch", "gpfm", "gpfm-demo-student-vit-ti14", "phikon", "student", "uni"}
    assert rows["gpfm-demo-student-vit-ti14"].split()[:4] == [
        "gpfm-demo-student-vit-ti14", "no", "192", "found"]  # bundled, labelled not GPFM
    assert rows["gpfm"].split()[:4] == ["gpfm", "yes", "1024", "found"]
    assert rows["gpfm"].endswith(str(weights))
    assert rows["conch"].split()[:4] == ["conch", "no", "512", "missing"]
    assert re.search(r"CC-BY-NC-ND-4.0 +yes", rows["uni"])  # licence, gated
    default = str(Path("~/.cache/napari-gpfm/weights/uni/pytorch_model.bin").expanduser())
    assert rows["uni"].endswith(default)
    assert "napari-gpfm models --download NAME" in out


def test_json_output(capsys):
    assert run(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"conch", "gpfm", "gpfm-demo-student-vit-ti14", "phikon", "uni"}
    assert rows["gpfm"]["is_gpfm"] is True and rows["phikon"]["embed_dim"] == 768
    student = rows["gpfm-demo-student-vit-ti14"]
    assert student["is_gpfm"] is False and student["weights"] == "found"
    assert rows["gpfm"]["weights"] == "missing" and rows["gpfm"]["env"] == "GPFM_WEIGHTS"
    assert rows["conch"]["gated"] is True


def test_download_unknown_model_fails_with_known_names(capsys):
    from napari_gpfm.cli import main

    assert main(["models", "--download", "gpfn"]) == 2  # one error line, like every command
    err = capsys.readouterr().err
    assert "unknown model 'gpfn'" in err and "gpfm" in err


def test_download_failure_is_reported(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(download_module, "hf_hub_download", offline)
    from napari_gpfm.cli import main

    assert main(["models", "--download", "gpfm"]) == 2
    err = capsys.readouterr().err
    assert "could not download the weights of 'gpfm'" in err and "no route to host" in err
    assert "GPFM_WEIGHTS" in err


def test_download_success_prints_path(monkeypatch, capsys):
    def fake_hub(repo_id, filename, revision=None, local_dir=None):
        path = Path(local_dir) / filename
        path.write_bytes(b"weights")
        return str(path)

    monkeypatch.setattr(download_module, "hf_hub_download", fake_hub)
    assert run(["models", "--download", "phikon", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = Path("~/.cache/napari-gpfm/weights/phikon/pytorch_model.bin").expanduser()
    assert result == {"name": "phikon", "path": str(expected)}
    assert expected.read_bytes() == b"weights"


@pytest.mark.parametrize("argv", [["models", "--download"], ["models", "--bogus"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as info:
        run(argv)
    assert info.value.code == 2
