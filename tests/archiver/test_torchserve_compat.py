"""Interoperability with the real torch-model-archiver 0.12 (a test dependency)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from archiver import MANIFEST_PATH, open_archive
from archiver.cli import cli
from click.testing import CliRunner

from .conftest import archiver_args

TORCH_MODEL_ARCHIVER = shutil.which("torch-model-archiver", path=os.path.dirname(sys.executable))
assert TORCH_MODEL_ARCHIVER, "torch-model-archiver 0.12 is a test dependency: pip install -e '.[test]'"


def members(output: Path) -> dict[str, bytes]:
    """Every file in an archive of any format, by its path inside the model directory."""
    if output.is_dir():
        return {p.relative_to(output).as_posix(): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    if zipfile.is_zipfile(output):
        with zipfile.ZipFile(output) as mar:
            return {name: mar.read(name) for name in mar.namelist() if not name.endswith("/")}
    with tarfile.open(output) as tgz:
        return {
            m.name.split("/", 1)[1]: tgz.extractfile(m).read()  # type: ignore[union-attr]
            for m in tgz.getmembers()
            if m.isfile()
        }


def comparable(files: dict[str, bytes]) -> tuple[dict, dict]:
    manifest = json.loads(files.pop(MANIFEST_PATH))
    manifest.pop("createdOn")
    return manifest, files


CASES = {
    "default, custom handler file": ([], None),
    "zip-store, builtin handler": (["--archive-format", "zip-store"], "image_classifier"),
    "tgz, handler module with function": (["--archive-format", "tgz"], "{src}/my_handler:handle"),
    "no-archive, handler module": (["--archive-format", "no-archive"], "{src}/my_handler"),
    "python3 runtime": (["--runtime", "python3"], None),
}


@pytest.mark.parametrize("case", CASES)
def test_same_inputs_give_the_same_manifest_and_files(model_inputs: Path, tmp_path: Path, case: str) -> None:
    extra, handler = CASES[case]
    handler = handler.format(src=model_inputs) if handler else None
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    result = CliRunner().invoke(cli, archiver_args(model_inputs, ours_dir, *extra, handler=handler))
    assert result.exit_code == 0, result.output
    theirs = subprocess.run(
        [TORCH_MODEL_ARCHIVER, *archiver_args(model_inputs, theirs_dir, *extra, handler=handler)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert theirs.returncode == 0, theirs.stderr
    [ours_out] = list(ours_dir.iterdir())
    [theirs_out] = list(theirs_dir.iterdir())
    assert ours_out.name == theirs_out.name
    our_manifest, our_files = comparable(members(ours_out))
    their_manifest, their_files = comparable(members(theirs_out))
    assert our_manifest == their_manifest
    assert our_files == their_files


@pytest.mark.parametrize("archive_format", ["default", "zip-store", "tgz", "no-archive"])
def test_archives_from_torch_model_archiver_open_with_our_reader(
    model_inputs: Path, tmp_path: Path, archive_format: str
) -> None:
    out = tmp_path / "theirs"
    out.mkdir()
    args = archiver_args(model_inputs, out, "--archive-format", archive_format)
    made = subprocess.run([TORCH_MODEL_ARCHIVER, *args], capture_output=True, text=True, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    [output] = list(out.iterdir())
    opened = open_archive(output, workdir_root=tmp_path)
    try:
        assert opened.manifest.model.model_name == "toy"
        assert opened.manifest.version == "2.1"
        assert opened.manifest.model.handler == "my_handler.py"
        assert opened.manifest.archiver_version == "0.12.0"
        assert (opened.model_dir / "weights.pt").read_bytes() == (model_inputs / "weights.pt").read_bytes()
        assert (opened.model_dir / "vocab" / "words.txt").is_file()
    finally:
        opened.cleanup()
