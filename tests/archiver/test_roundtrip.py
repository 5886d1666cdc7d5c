"""Build an archive in each format, open it with the reader, and get the same model back."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from archiver import ArchiveSpec, build_archive, open_archive
from archiver.build import SUFFIXES

FORMATS = ["default", "zip-store", "tgz", "no-archive"]


def spec_for(src: Path, out: Path, archive_format: str, **overrides) -> ArchiveSpec:
    fields = dict(
        model_name="toy",
        version="3.0",
        handler=str(src / "my_handler.py"),
        model_file=str(src / "model.py"),
        serialized_file=str(src / "weights.pt"),
        extra_files=f"{src / 'index_to_name.json'},{src / 'assets'}",
        requirements_file=str(src / "requirements.txt"),
        config_file=str(src / "model-config.yaml"),
        export_path=str(out),
        archive_format=archive_format,
    )
    fields.update(overrides)
    return ArchiveSpec(**fields)


@pytest.mark.parametrize("archive_format", FORMATS)
def test_round_trip(model_inputs: Path, tmp_path: Path, archive_format: str) -> None:
    output = build_archive(spec_for(model_inputs, tmp_path, archive_format))
    assert output == tmp_path / f"toy{SUFFIXES[archive_format]}"
    opened = open_archive(output, workdir_root=tmp_path)
    try:
        model = opened.manifest.model
        assert (model.model_name, model.model_version, model.handler) == ("toy", "3.0", "my_handler.py")
        assert (model.serialized_file, model.model_file) == ("weights.pt", "model.py")
        assert (model.requirements_file, model.config_file) == ("requirements.txt", "model-config.yaml")
        root = opened.model_dir
        assert (root / "weights.pt").read_bytes() == (model_inputs / "weights.pt").read_bytes()
        assert (root / "vocab" / "words.txt").read_text() == "hello\n"
        assert (root / "labels.txt").is_file()
        assert not (root / "__pycache__").exists() and not (root / ".git").exists()
        if archive_format == "no-archive":
            assert opened.workdir is None and root == output
        else:
            # Extracted into a private directory only its owner can enter.
            # A .tar.gz keeps its files under a top folder named after the model.
            top = opened.workdir / "toy" if archive_format == "tgz" else opened.workdir
            assert root == top
            assert stat.S_IMODE(opened.workdir.stat().st_mode) == 0o700
    finally:
        opened.cleanup()
    if opened.workdir is not None:
        assert not opened.workdir.exists()


@pytest.mark.parametrize("archive_format", FORMATS)
def test_force_replaces_the_previous_output(model_inputs: Path, tmp_path: Path, archive_format: str) -> None:
    build_archive(spec_for(model_inputs, tmp_path, archive_format, version="1"))
    build_archive(spec_for(model_inputs, tmp_path, archive_format, version="2", force=True))
    opened = open_archive(tmp_path / f"toy{SUFFIXES[archive_format]}", workdir_root=tmp_path)
    assert opened.manifest.version == "2"
    opened.cleanup()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_progress_reports_every_byte(model_inputs: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    build_archive(spec_for(model_inputs, tmp_path, "default"), progress=seen.append)
    sources = [p for p in model_inputs.rglob("*") if p.is_file() and "__pycache__" not in p.parts and ".git" not in p.parts]
    assert sum(seen) == sum(p.stat().st_size for p in sources)


def test_later_inputs_win_on_name_clashes(model_inputs: Path, tmp_path: Path) -> None:
    # torch-model-archiver copies extra files after the handler, so a same-named extra file wins.
    other = tmp_path / "other"
    other.mkdir()
    (other / "my_handler.py").write_text("# from extra files\n")
    build_archive(spec_for(model_inputs, tmp_path, "no-archive", extra_files=str(other / "my_handler.py")))
    assert (tmp_path / "toy" / "my_handler.py").read_text() == "# from extra files\n"


def test_incompressible_entries_are_stored_in_a_default_archive(tmp_path: Path) -> None:
    import os
    import zipfile

    (tmp_path / "random.bin").write_bytes(os.urandom(2 << 20))
    (tmp_path / "zeros.bin").write_bytes(bytes(2 << 20))
    spec = ArchiveSpec(
        model_name="m", version="1", handler="base_handler", export_path=str(tmp_path),
        extra_files=f"{tmp_path / 'random.bin'},{tmp_path / 'zeros.bin'}",
    )  # fmt: skip
    with zipfile.ZipFile(build_archive(spec)) as mar:
        methods = {info.filename: info.compress_type for info in mar.infolist()}
        assert mar.testzip() is None
    assert methods["random.bin"] == zipfile.ZIP_STORED
    assert methods["zeros.bin"] == zipfile.ZIP_DEFLATED
