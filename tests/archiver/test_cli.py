"""The model-archiver command line: flags, outputs and one-line failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from archiver import MANIFEST_PATH
from archiver.cli import cli

from .conftest import archiver_args


def run(args: list[str]):
    return CliRunner().invoke(cli, args, prog_name="model-archiver")


def test_default_archive_layout_and_manifest(model_inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run(archiver_args(model_inputs, out))
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(out / "toy.mar") as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read(MANIFEST_PATH))
        assert {info.compress_type for info in mar.infolist()} == {zipfile.ZIP_DEFLATED}
    assert names == {
        "model.py", "weights.pt", "my_handler.py", "index_to_name.json", "requirements.txt",
        "model-config.yaml", "labels.txt", "vocab/words.txt", MANIFEST_PATH,
    }  # fmt: skip
    assert list(manifest) == ["createdOn", "runtime", "model", "archiverVersion"]
    assert manifest["model"] == {
        "modelName": "toy",
        "serializedFile": "weights.pt",
        "handler": "my_handler.py",
        "modelFile": "model.py",
        "modelVersion": "2.1",
        "requirementsFile": "requirements.txt",
        "configFile": "model-config.yaml",
    }
    assert manifest["archiverVersion"] == "0.12.0"


def test_builtin_handler_is_not_copied(model_inputs: Path, tmp_path: Path) -> None:
    result = run(archiver_args(model_inputs, tmp_path, handler="image_classifier"))
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(tmp_path / "toy.mar") as mar:
        assert "my_handler.py" not in mar.namelist()
        assert json.loads(mar.read(MANIFEST_PATH))["model"]["handler"] == "image_classifier"


def test_handler_with_function_copies_the_module(model_inputs: Path, tmp_path: Path) -> None:
    handler = f"{model_inputs / 'my_handler.py'}:handle"
    result = run(archiver_args(model_inputs, tmp_path, handler=handler))
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(tmp_path / "toy.mar") as mar:
        assert "my_handler.py" in mar.namelist()
        assert json.loads(mar.read(MANIFEST_PATH))["model"]["handler"] == "my_handler.py:handle"


def test_extra_files_glob(model_inputs: Path, tmp_path: Path) -> None:
    args = archiver_args(model_inputs, tmp_path)
    args[args.index("--extra-files") + 1] = str(model_inputs / "*.json")
    assert run(args).exit_code == 0
    with zipfile.ZipFile(tmp_path / "toy.mar") as mar:
        assert "index_to_name.json" in mar.namelist()
        assert "labels.txt" not in mar.namelist()


def test_existing_output_needs_force(model_inputs: Path, tmp_path: Path) -> None:
    assert run(archiver_args(model_inputs, tmp_path)).exit_code == 0
    before = (tmp_path / "toy.mar").read_bytes()
    again = run(archiver_args(model_inputs, tmp_path))
    assert again.exit_code == 1
    assert "already exists" in again.output and "--force" in again.output
    assert (tmp_path / "toy.mar").read_bytes() == before
    assert run(archiver_args(model_inputs, tmp_path, "-f")).exit_code == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (("--model-name", "bad name!"), "invalid model name"),
        (("--model-name", "-leading-dash"), "invalid model name"),
        (("--serialized-file", "missing.pt"), "serialized file not found: missing.pt"),
        (("--model-file", "missing.py"), "model file not found: missing.py"),
        (("--handler", "missing_handler.py"), "handler file not found: missing_handler.py"),
        (("--handler", "missing_handler"), "handler file not found: missing_handler.py"),
        (("--extra-files", "nope.txt"), "extra file not found: nope.txt"),
        (("-r", "nope.txt"), "requirements file not found: nope.txt"),
        (("--export-path", "no/such/dir"), "export path is not a directory"),
        (("--archive-format", "rar"), "'rar' is not one of"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    model_inputs: Path, tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = archiver_args(model_inputs, out)
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    result = run(args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("model-archiver: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert list(out.iterdir()) == []


def test_missing_required_flag_is_one_line(tmp_path: Path) -> None:
    result = run(["--version", "1.0", "--handler", "image_classifier"])
    assert result.exit_code == 2
    assert result.output.strip() == "model-archiver: error: Missing option '--model-name'."


def test_unreadable_handler(model_inputs: Path, tmp_path: Path) -> None:
    (model_inputs / "dir_handler.py").mkdir()
    (model_inputs / "dangling.py").symlink_to(model_inputs / "gone.py")
    for handler, message in [("dir_handler.py", "is not a file"), ("dangling.py", "not found")]:
        result = run(archiver_args(model_inputs, tmp_path, handler=str(model_inputs / handler)))
        assert result.exit_code == 1
        assert message in result.output and result.output.count("\n") == 1


def test_failed_write_leaves_no_partial_archive(model_inputs: Path, tmp_path: Path) -> None:
    # A source that vanishes between planning and writing makes the write fail part-way:
    # neither the archive nor its temporary file may remain.
    from archiver.build import ArchiveSpec, build_archive, collect_entries

    args = dict(model_name="toy", version="1", handler="image_classifier", export_path=str(tmp_path / "o"))
    (tmp_path / "o").mkdir()
    weights = model_inputs / "weights.pt"
    spec = ArchiveSpec(serialized_file=str(weights), **args)
    entries = collect_entries(spec)
    weights.unlink()
    with pytest.raises(FileNotFoundError):
        build_archive(spec, entries)
    assert list((tmp_path / "o").iterdir()) == []


def test_installed_command_runs_as_a_subprocess(model_inputs: Path, tmp_path: Path) -> None:
    exe = shutil.which("model-archiver", path=os.path.dirname(sys.executable))
    assert exe, "the model-archiver console script is not installed next to this interpreter"
    ok = subprocess.run([exe, *archiver_args(model_inputs, tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "toy.mar").is_file()
    bad = subprocess.run([exe, *archiver_args(model_inputs, tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "already exists" in bad.stderr
    assert "Traceback" not in bad.stderr
