"""Archives built to attack the extractor: each is refused with one line naming the entry."""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from archiver import MANIFEST_PATH, ArchiveError, ExtractLimits, open_archive
from tests.conftest import zip_archive

MANIFEST = json.dumps({"runtime": "python", "model": {"modelName": "m", "handler": "h.py", "modelVersion": "1"}})


make_zip = functools.partial(zip_archive, manifest=MANIFEST)


def make_tar(path: Path, *members: tarfile.TarInfo, data: dict[str, bytes] = {}) -> Path:  # noqa: B006 - never mutated
    with tarfile.open(path, "w:gz") as archive:
        manifest = MANIFEST.encode()
        info = tarfile.TarInfo(f"m/{MANIFEST_PATH}")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
        for member in members:
            payload = data.get(member.name, b"")
            member.size = len(payload) if member.isreg() else 0
            archive.addfile(member, io.BytesIO(payload))
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def refused(archive: Path, tmp_path: Path, limits: ExtractLimits = ExtractLimits()) -> str:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    with pytest.raises(ArchiveError) as caught:
        open_archive(archive, workdir_root=work, limits=limits)
    message = str(caught.value)
    assert "\n" not in message
    # A refused archive leaves no extraction directory behind.
    assert list(work.iterdir()) == []
    return message


@pytest.fixture(autouse=True)
def nothing_escapes(tmp_path: Path):
    yield
    # Every hostile payload is named "evil"; none may land anywhere near the sandbox.
    for place in (tmp_path, tmp_path.parent, Path("/tmp")):
        assert not any(p.name.startswith("evil") for p in place.iterdir())


@pytest.mark.parametrize("name", ["../evil.txt", "sub/../../evil.txt", "./../evil.txt"])
def test_zip_slip(tmp_path: Path, name: str) -> None:
    message = refused(make_zip(tmp_path / "slip.mar", (name, b"pwned")), tmp_path)
    assert name in message and "outside" in message


@pytest.mark.parametrize("name", ["/tmp/evil.txt", "C:/evil.txt", "\\evil.txt"])
def test_absolute_path(tmp_path: Path, name: str) -> None:
    message = refused(make_zip(tmp_path / "abs.mar", (name, b"pwned")), tmp_path)
    assert "absolute path" in message and "abs.mar" in message


def test_symlink_escape_then_write_through_it(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "link.mar", ("escape/evil.txt", b"pwned"), symlinks={"escape": str(tmp_path)})
    message = refused(archive, tmp_path)
    assert "'escape'" in message


@pytest.mark.parametrize("target", ["../../..", "/etc", "a/../../x"])
def test_symlink_pointing_outside(tmp_path: Path, target: str) -> None:
    message = refused(make_zip(tmp_path / "link.mar", symlinks={"weights.pt": target}), tmp_path)
    assert "'weights.pt'" in message and ("outside" in message or "absolute" in message)


def test_chain_of_links_that_only_escapes_together(tmp_path: Path) -> None:
    # x -> y/.. is harmless while y is missing; once y -> . exists, x points at the parent.
    archive = make_zip(tmp_path / "chain.mar", symlinks={"x": "y/..", "y": "."})
    assert "outside" in refused(archive, tmp_path)


def test_links_inside_the_archive_are_kept(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "ok.mar", ("real/weights.pt", b"w"), symlinks={"weights.pt": "real/weights.pt"})
    opened = open_archive(archive, workdir_root=tmp_path)
    assert (opened.model_dir / "weights.pt").read_bytes() == b"w"
    opened.cleanup()


def test_zip_bomb_is_stopped_by_the_size_cap(tmp_path: Path) -> None:
    bomb = make_zip(tmp_path / "bomb.mar", ("zeros.bin", bytes(64 << 20)))
    assert bomb.stat().st_size < 1 << 20
    message = refused(bomb, tmp_path, ExtractLimits(max_bytes=8 << 20))
    assert "'zeros.bin'" in message and "8388608-byte limit" in message


def test_entry_count_cap(tmp_path: Path) -> None:
    many = make_zip(tmp_path / "many.mar", *[(f"f{i}", b"") for i in range(50)])
    assert "more than 20 entries" in refused(many, tmp_path, ExtractLimits(max_entries=20))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_zip(tmp_path: Path, damage: str) -> None:
    good = make_zip(tmp_path / "good.mar", ("weights.pt", os.urandom(4096))).read_bytes()
    corrupt = tmp_path / "corrupt.mar"
    corrupt.write_bytes({"truncated": good[: len(good) // 2], "garbage": os.urandom(2048), "empty": b""}[damage])
    message = refused(corrupt, tmp_path)
    assert "corrupt.mar" in message and ("not a model archive" in message or "corrupt" in message)


def test_zip_with_a_flipped_byte_fails_its_crc(tmp_path: Path) -> None:
    payload = b"A" * 10_000
    data = bytearray(make_zip(tmp_path / "x.mar", ("weights.pt", payload)).read_bytes())
    start = data.index(b"weights.pt") + len("weights.pt")
    data[start + 5] ^= 0xFF
    (tmp_path / "flip.mar").write_bytes(bytes(data))
    assert "corrupt" in refused(tmp_path / "flip.mar", tmp_path)


def test_tar_special_files_and_escapes(tmp_path: Path) -> None:
    cases = {
        "fifo": tar_member("m/pipe", tarfile.FIFOTYPE),
        "device": tar_member("m/dev", tarfile.CHRTYPE),
        "slip": tar_member("m/../../evil.txt"),
        "absolute": tar_member("/tmp/evil.txt"),
        "hardlink": tar_member("m/evil_link", tarfile.LNKTYPE, "../../etc/passwd"),
        "symlink": tar_member("m/evil_sym", tarfile.SYMTYPE, "/etc/passwd"),
    }
    for label, member in cases.items():
        archive = make_tar(tmp_path / f"{label}.tar.gz", member, data={member.name: b"pwned"})
        message = refused(archive, tmp_path)
        assert repr(member.name) in message, (label, message)


def test_tar_hardlink_inside_is_copied(tmp_path: Path) -> None:
    real = tar_member("m/weights.pt")
    link = tar_member("m/alias.pt", tarfile.LNKTYPE, "m/weights.pt")
    opened = open_archive(make_tar(tmp_path / "ok.tar.gz", real, link, data={"m/weights.pt": b"w"}), workdir_root=tmp_path)
    assert (opened.model_dir / "alias.pt").read_bytes() == b"w"
    assert not (opened.model_dir / "alias.pt").is_symlink()
    opened.cleanup()


@pytest.mark.parametrize(
    "manifest, message",
    [
        (b"{not json", "is not valid JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'{"runtime": "python"}', "missing model entry"),
        (b'{"model": {"handler": "h.py"}}', "model name is not defined"),
        (b'{"runtime": "java", "model": {"modelName": "m"}}', "runtime 'java' is not one of"),
        (b'{"model": {"modelName": "../etc"}}', "invalid model name"),
        (b'{"model": {"modelName": "m", "modelVersion": 3}}', "model.modelVersion"),
    ],
)
def test_invalid_manifest(tmp_path: Path, manifest: bytes, message: str) -> None:
    path = tmp_path / "bad.mar"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MANIFEST_PATH, manifest)
    assert message in refused(path, tmp_path)


def test_missing_manifest_falls_back_to_the_file_name(tmp_path: Path) -> None:
    # TorchServe serves such archives, naming the model after the file.
    path = tmp_path / "legacy-model.mar"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights.pt", b"w")
    opened = open_archive(path, workdir_root=tmp_path)
    assert opened.manifest.model.model_name == "legacy-model"
    assert opened.manifest.version == "1.0"
    assert opened.manifest.model.handler is None
    opened.cleanup()


def test_legacy_manifest_with_unknown_keys(tmp_path: Path) -> None:
    legacy = {
        "runtime": "python",
        "model": {"modelName": "old", "handler": "h:handle", "modelVersion": "1.0", "description": "x"},
        "modelServerVersion": "1.0",
        "implementationVersion": "1.0",
        "specificationVersion": "1.0",
    }
    path = tmp_path / "old.mar"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MANIFEST_PATH, json.dumps(legacy))
    opened = open_archive(path, workdir_root=tmp_path)
    assert opened.manifest.model.handler == "h:handle"
    assert opened.manifest.created_on is None and opened.manifest.archiver_version is None
    opened.cleanup()
