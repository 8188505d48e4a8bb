"""One error rule for the command line, and one exception root for the package.

Every sub-command the dispatcher registers is found by walking the real parser's sub-parsers, so
a new sub-command is covered (or has to be listed here on purpose) without editing this file's
loop. Each is run in-process with an input file that does not exist: exit code 2 and exactly one
stderr line, ``error: ...``, naming that file.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import napari_gpfm
from napari_gpfm import cli
from napari_gpfm.errors import NapariGpfmError

# Sub-commands that read no input file, so nothing can be missing: the bad input each gets
# instead (an unknown model name), with why.
NO_INPUT_FILE = {
    "models": (["--download", "no-such-model"], "--download takes a model name, not a file"),
    "demo": (["--headless", "--model", "no-such-model", "--out", "{out}"],
             "always runs on the bundled sample slide"),
}

# Input files that argparse does not require (the command needs one of several, or has a
# default) but a run needs: the extra arguments each such sub-command gets. "{missing}" is a
# folder that does not exist.
OPTIONAL_INPUTS = {
    "view": ["{missing}/slide.svs", "--headless"],  # no slide means the bundled sample
    "distill": ["--config", "{missing}/experiment.yaml"],
    "pathotune train": ["--tiles-csv", "{missing}/tiles.csv"],  # or --slide + --patch-labels
    "pathotune predict": ["--tiles-csv", "{missing}/tiles.csv"],  # or --slide + --store
}


def _sub_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """``("pathotune predict", parser)`` for every runnable (leaf) sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases map to the same parser
                    seen.add(id(sub))
                    yield from _sub_commands(sub, (*prefix, name))
            return
    if prefix:
        yield " ".join(prefix), parser


COMMANDS = dict(_sub_commands(cli.build_parser()))


def test_every_sub_command_is_found_and_every_listed_one_exists():
    assert {"embed", "classify", "train-classifier", "pathotune train", "distill"} <= set(COMMANDS)
    stale = (set(NO_INPUT_FILE) | set(OPTIONAL_INPUTS)) - set(COMMANDS)
    assert not stale, f"listed here but no longer registered: {sorted(stale)}"


def _argv(name: str, parser: argparse.ArgumentParser, missing: Path, out: Path) -> list[str]:
    """The sub-command with every required argument: inputs under ``missing`` (absent),
    ``--out`` under ``out`` (may be created), plus its :data:`OPTIONAL_INPUTS`."""
    argv = name.split()
    for action in parser._actions:
        positional = not action.option_strings
        needed = action.required if not positional else action.nargs not in ("?", "*")
        if not needed or isinstance(action, argparse._SubParsersAction):
            continue
        value = str(out / action.dest) if action.dest == "out" else str(missing / action.dest)
        argv += [value] if positional else [action.option_strings[0], value]
    return argv + [a.format(missing=missing) for a in OPTIONAL_INPUTS.get(name, [])]


def _run_main(argv: list[str], capsys) -> tuple[int, list[str], str]:
    try:
        code = cli.main(argv)
    finally:
        if "napari" in sys.modules:  # `view` and `demo` open a (hidden) viewer
            import napari

            napari.Viewer.close_all()
    err = capsys.readouterr().err
    return code, err.splitlines(), err


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - set(NO_INPUT_FILE)))
def test_missing_input_file_is_one_error_line_and_exit_2(name, tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    argv = _argv(name, COMMANDS[name], missing, tmp_path / "out")
    if not any(str(missing) in a for a in argv):
        pytest.fail(f"`napari-gpfm {name}` was given no input file: list the option that names "
                    "its input in OPTIONAL_INPUTS, or the command in NO_INPUT_FILE")
    code, lines, err = _run_main(argv, capsys)
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    given = [a for a in argv if a.startswith(str(missing))]
    assert any(path in lines[0] for path in given), err  # names a missing file, whole


# Known breaches of the rule, each failing its test today (strict: once fixed, the xfail fails and
# the entry has to go). Owners: see the reason.
KNOWN_GAPS: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[n]))
    if n in KNOWN_GAPS else n for n in sorted(NO_INPUT_FILE)])
def test_a_command_without_input_file_answers_a_bad_name_with_one_error_line(name, tmp_path,
                                                                              capsys):
    argv = [*name.split(), *(a.format(out=tmp_path / "out") for a in NO_INPUT_FILE[name][0])]
    code, lines, err = _run_main(argv, capsys)
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "no-such-model" in lines[0], err


def test_bad_input_error_maps_to_one_line_but_a_bug_keeps_its_traceback(capsys):
    from napari_gpfm.slide import SlideOpenError

    def bad_input(args):
        raise SlideOpenError("/data/x.svs", "not a slide\n(second line)")

    def bug(args):
        raise ZeroDivisionError("a bug")

    assert cli.run(argparse.Namespace(func=bad_input)) == 2
    assert capsys.readouterr().err == "error: /data/x.svs: not a slide (second line)\n"
    with pytest.raises(ZeroDivisionError):
        cli.run(argparse.Namespace(func=bug))


def test_a_missing_file_from_the_os_is_mapped_too(tmp_path, capsys):
    def reads(args):
        open(tmp_path / "gone.csv").close()

    assert cli.run(argparse.Namespace(func=reads)) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'gone.csv'}: No such file or directory\n"


# --- one exception root --------------------------------------------------------------------------


def _examples():
    """One error of each package, built as the package builds it, with its extra builtin base."""
    from napari_gpfm.pathotune.io import BackboneMismatchError, ClassifierFileError
    from napari_gpfm.pathotune.predict import GeometryMismatchError
    from napari_gpfm.analyses.probe import ProbeFileError
    from napari_gpfm.analyses.probe import RecipeMismatchError as ProbeRecipeMismatchError
    from napari_gpfm.analyses.similarity import ModelMismatchError
    from napari_gpfm.annotations.geojson import GeoJSONError
    from napari_gpfm.distill.config import ConfigError
    from napari_gpfm.embeddings import IncompleteStoreError, RecipeMismatchError, StoreError
    from napari_gpfm.encoders.errors import (
        CheckpointError,
        ModelCardError,
        UnknownModelError,
        WeightsNotFoundError,
    )
    from napari_gpfm.errors import InputFileError, InputFileNotFoundError, UsageError
    from napari_gpfm.slide import MissingMppError, SlideOpenError, TileReadError
    from napari_gpfm.tiles import NoTissueError

    assert ProbeRecipeMismatchError is RecipeMismatchError  # one class, two import paths
    return {
        "slide": (SlideOpenError("a.svs", "truncated"), None),
        "slide (mpp)": (MissingMppError("a.svs"), None),
        "slide (tile)": (TileReadError("a.svs", 0, 1, 2, "bad jpeg"), None),
        "tiles": (NoTissueError("a.svs: no tissue"), RuntimeError),
        "encoders": (ModelCardError("m.yaml", "bad key"), ValueError),
        "encoders (name)": (UnknownModelError("x", ["gpfm"]), LookupError),
        "encoders (weights)": (WeightsNotFoundError("w.pth: not found"), FileNotFoundError),
        "encoders (checkpoint)": (CheckpointError("w.pth", "unreadable"), None),
        "embeddings": (StoreError("s.h5", "unreadable"), None),
        "embeddings (partial)": (IncompleteStoreError("s.h5", "4 of 10"), None),
        "embeddings (recipe)": (RecipeMismatchError("s.h5", {"model": ("a", "b")}), ValueError),
        "annotations": (GeoJSONError("a.geojson: not valid JSON"), ValueError),
        "analyses (probe)": (ProbeFileError("p.npz", "corrupt"), ValueError),
        "analyses (similarity)": (ModelMismatchError("gpfm vs uni"), ValueError),
        "pathotune": (ClassifierFileError("c.safetensors", "damaged"), ValueError),
        "pathotune (backbone)": (BackboneMismatchError("c.safetensors", {"name": ("a", "b")}),
                                 ValueError),
        "pathotune (geometry)": (GeometryMismatchError("s.h5: 224 µm vs 112 µm"), ValueError),
        "distill": (ConfigError("unknown config key 'x'"), ValueError),
        "cli inputs": (InputFileError("t.csv", "needs a 'file' column"), ValueError),
        "cli usage": (UsageError("give --tiles-csv"), ValueError),
        "cli missing": (InputFileNotFoundError("t.csv", "tiles CSV"), FileNotFoundError),
    }


EXAMPLES = _examples()


@pytest.mark.parametrize("package", sorted(EXAMPLES))
def test_each_package_error_is_caught_as_napari_gpfm_error(package):
    exc, builtin = EXAMPLES[package]
    with pytest.raises(NapariGpfmError):
        raise exc
    if builtin is not None:  # callers that catch the builtin keep working
        with pytest.raises(builtin):
            raise exc


def test_recipe_mismatch_from_a_store_and_from_a_probe_is_one_class_with_one_diff(tmp_path):
    from napari_gpfm.analyses.probe import fit_probe, load_probe
    from napari_gpfm.embeddings import RecipeMismatchError
    from napari_gpfm.embeddings.recipe import recipe_diff

    import numpy as np

    recipe = {"model": "gpfm", "weights_sha256": "ab", "target_mpp": 0.5, "patch_size": 224}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = np.repeat([0, 1], 20)
    path = fit_probe(x, y, ["a", "b"], recipe=recipe).save(tmp_path / "p.npz")
    other = dict(recipe, target_mpp=0.25, overlap=16)  # overlap: not a probe key
    with pytest.raises(RecipeMismatchError) as err:
        load_probe(path, expected_recipe=other)
    assert isinstance(err.value, ValueError) and err.value.path == Path(path)
    assert err.value.diff == recipe_diff(recipe, other, ("target_mpp",)) == {
        "target_mpp": (0.5, 0.25)}
    assert recipe_diff({"mpp": 0.5}, {"mpp": 0.5 + 1e-12}) == {}  # the key's rounding rule


# Exception classes that are not bad input, or not (yet) under the root, with the reason.
NOT_UNDER_ROOT = {
    "napari_gpfm.distill.train.NonFiniteLossError": "the run diverged: not bad input",
    "napari_gpfm.analyses.export.ExportCancelled": "the user stopped an export: not bad input",
}


def test_every_exception_class_of_the_core_derives_from_the_root():
    """Walks every module except the Qt docks, so a new error class is checked automatically."""
    strays = []
    for mod in pkgutil.walk_packages(napari_gpfm.__path__, "napari_gpfm."):
        if mod.name.startswith("napari_gpfm._qt") or mod.name.endswith("__main__"):
            continue
        module = importlib.import_module(mod.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, Exception)
                    and not issubclass(obj, Warning) and obj.__module__ == module.__name__
                    and not issubclass(obj, NapariGpfmError)
                    and f"{module.__name__}.{name}" not in NOT_UNDER_ROOT):
                strays.append(f"{module.__name__}.{name}")
    assert not strays, f"derive these from napari_gpfm.errors.NapariGpfmError: {strays}"


def test_the_root_module_imports_nothing_heavy():
    code = ("import sys, napari_gpfm.errors; "
            "print(sorted(m for m in ('numpy', 'torch', 'qtpy', 'napari') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_system_exit_below_the_cli():
    root = Path(napari_gpfm.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "raise SystemExit" in p.read_text(encoding="utf-8")]
    assert not offenders, offenders
