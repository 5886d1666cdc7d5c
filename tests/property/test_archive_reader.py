"""Property tests of the archive reader: whatever a zip or tar holds, ``open_archive`` either opens it
inside its own directory or raises ArchiveError, and writes nothing anywhere else.

Each example runs in a fresh sandbox, nested a few levels deep so that ``..`` chains have real
directories to land in. Member names are built from path pieces chosen to be dangerous (``..``,
absolute paths into the sandbox, drive letters, backslashes, NUL) mixed with arbitrary text.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from archiver import MANIFEST_PATH, ArchiveError, ExtractLimits, open_archive
from archiver.paths import confined
from archiver.paths import manifest_paths as manifest_path_entries

LIMITS = ExtractLimits(max_bytes=64 << 10, max_entries=24)
OUTSIDE = "<outside>"  # stands for the absolute path of a directory outside the extraction root

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@dataclass(frozen=True)
class Member:
    kind: str  # "file", "dir", "symlink" or "hardlink" (tar only)
    name: str
    head: bytes = b""
    target: str = ""
    zeros: int = 0  # appended to head: big, highly compressible content

    @property
    def data(self) -> bytes:
        return self.head + bytes(self.zeros)


pieces = st.sampled_from(
    ["a", "b", "weights.pt", ".", "..", "", "C:", "c:", "\\", "..\\..", "a\\b", "~", "\x00", " ", "MAR-INF", OUTSIDE]
)
paths = st.one_of(
    st.lists(pieces, min_size=1, max_size=7).map("/".join),
    st.text(max_size=24),
    st.just(MANIFEST_PATH),
)
members = st.one_of(
    st.builds(Member, st.just("file"), paths, st.binary(max_size=256)),
    st.builds(Member, st.just("file"), paths, zeros=st.just(LIMITS.max_bytes // 2)),  # toward the size cap
    st.builds(Member, st.just("dir"), paths),
    st.builds(Member, st.just("symlink"), paths, target=paths),
    st.builds(Member, st.just("hardlink"), paths, target=paths),
)
archives = st.tuples(st.sampled_from(["zip", "tar", "tar.gz"]), st.lists(members, max_size=30))


# Deep enough that the longest ".." chain in ``paths``, from an extraction directory under work/, stays in the sandbox.
NESTING = ("l1", "l2", "l3", "l4", "l5")


@contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh directory tree: <root>/l1/.../l5/{src,outside,work}; the archive is extracted under work."""
    with tempfile.TemporaryDirectory(prefix="marserve-prop-") as root:
        base = Path(root, *NESTING)
        for name in ("src", "outside", "work"):
            (base / name).mkdir(parents=True)
        (base / "outside" / "canary.txt").write_text("canary")
        yield base


def resolve(text: str, outside: Path) -> str:
    return text.replace(OUTSIDE, str(outside))


def write_archive(path: Path, form: str, entries: list[Member], outside: Path) -> bool:
    """Write the archive; False when the format itself cannot hold these entries."""
    try:
        if form == "zip":
            _write_zip(path, entries, outside)
        else:
            _write_tar(path, "w:gz" if form == "tar.gz" else "w", entries, outside)
    except (ValueError, UnicodeError, OverflowError, IndexError):  # IndexError: zipfile on an empty name
        return False
    return True


def _write_zip(path: Path, entries: list[Member], outside: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in entries:
            name = resolve(member.name, outside)
            if member.kind == "dir":
                archive.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
            elif member.kind in ("symlink", "hardlink"):  # zip has only symbolic links
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(info, resolve(member.target, outside))
            else:
                archive.writestr(name, member.data)


def _write_tar(path: Path, mode: str, entries: list[Member], outside: Path) -> None:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for member in entries:
            info = tarfile.TarInfo(resolve(member.name, outside))
            if member.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif member.kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if member.kind == "symlink" else tarfile.LNKTYPE
                info.linkname = resolve(member.target, outside)
            else:
                info.size = len(member.data)
            archive.addfile(info, io.BytesIO(member.data) if member.kind == "file" else None)


def snapshot(root: Path, skip: Path) -> dict[str, bytes | str | None]:
    """Every path under ``root`` except ``skip``'s contents: file bytes, link targets, None for directories."""
    found: dict[str, bytes | str | None] = {}
    for directory, dirs, files in os.walk(root):
        if Path(directory) == skip:
            dirs.clear()
            continue
        for name in dirs + files:
            path = Path(directory) / name
            if path.is_symlink():
                found[str(path)] = os.readlink(path)
            elif path.is_file():
                found[str(path)] = path.read_bytes()
            else:
                found[str(path)] = None
    return found


def assert_contained(directory: Path, allowed: set[bytes]) -> None:
    """Everything extracted lies inside ``directory``: plain files holding given bytes, directories, inner links."""
    real_root = directory.resolve()
    for where, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(where) / name
            assert path.resolve().is_relative_to(real_root), path
            mode = path.lstat().st_mode
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode), path
            if stat.S_ISREG(mode):
                assert path.read_bytes() in allowed, path


def check_open(path: Path, base: Path, allowed: set[bytes]) -> None:
    work = base / "work"
    tree = base.parents[len(NESTING) - 1]
    before = snapshot(tree, work)
    try:
        opened = open_archive(path, workdir_root=work, limits=LIMITS, default_name="m")
    except ArchiveError as exc:
        assert "\n" not in str(exc)
        # A refused archive leaves nothing behind.
        assert list(work.iterdir()) == []
    else:
        assert opened.workdir is not None and opened.workdir.parent == work
        assert opened.model_dir.resolve().is_relative_to(opened.workdir.resolve())
        assert_contained(opened.workdir, allowed)
        opened.cleanup()
        assert list(work.iterdir()) == []
    assert snapshot(tree, work) == before


@SETTINGS
@given(archives)
@example(("zip", [Member("file", "../../../../evil", b"x")]))
@example(("tar", [Member("symlink", "l", target=OUTSIDE), Member("file", "l/evil", b"x")]))
@example(("tar", [Member("symlink", "x", target="y/.."), Member("symlink", "y", target=".")]))
@example(("tar", [Member("hardlink", "h", target=OUTSIDE + "/canary.txt")]))
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_extraction_stays_inside_or_raises_archive_error(archive: tuple[str, list[Member]]) -> None:
    form, entries = archive
    with sandbox() as base:
        path = base / "src" / f"model.{form}"
        if not write_archive(path, form, entries, base / "outside"):
            return
        targets = {resolve(m.target, base / "outside").encode() for m in entries}  # a zip link's data is its target
        check_open(path, base, {m.data for m in entries} | targets)


@SETTINGS
@given(st.sampled_from(["zip", "tar.gz"]), st.lists(members, max_size=8), st.data())
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_damaged_archives_are_archive_errors(form: str, entries: list[Member], data: st.DataObject) -> None:
    with sandbox() as base:
        path = base / "src" / f"model.{form}"
        if not write_archive(path, form, entries, base / "outside"):
            return
        raw = bytearray(path.read_bytes())
        # Truncate, then overwrite a few bytes anywhere: headers, sizes, names, compressed data.
        # Places are drawn as fractions: the archive's length varies with the sandbox's path.
        raw = raw[: round(len(raw) * data.draw(st.floats(0, 1), label="kept"))]
        for _ in range(data.draw(st.integers(0, 8), label="flips")):
            if raw:
                raw[int(len(raw) * data.draw(st.floats(0, 1, exclude_max=True)))] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(raw))
        # Damage can decompress to anything, so any extracted bytes are allowed; only where they land matters.
        check_open(path, base, allowed=_Anything())


class _Anything(set):  # type: ignore[type-arg]
    def __contains__(self, item: object) -> bool:
        return True


@SETTINGS
@given(st.binary(max_size=2048), st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b\x08"]))
def test_arbitrary_bytes_are_archive_errors(noise: bytes, magic: bytes) -> None:
    with sandbox() as base:
        path = base / "src" / "noise.mar"
        path.write_bytes(magic + noise)
        check_open(path, base, allowed=_Anything())


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(["a", "b", "c.txt", "d.pt"]), min_size=1, max_size=3), st.binary(max_size=512)
        ),
        max_size=10,
    )
)
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_plain_archives_round_trip(files: list[tuple[list[str], bytes]]) -> None:
    # Names that are never both a file and a directory's prefix, so every archive here is valid.
    contents = {"/".join(parts[:-1] + ["f_" + parts[-1]]): data for parts, data in files}
    with sandbox() as base:
        path = base / "src" / "plain.mar"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in contents.items():
                archive.writestr(name, data)
        opened = open_archive(path, workdir_root=base / "work", limits=LIMITS, default_name="m")
        try:
            extracted = {
                str(p.relative_to(opened.workdir)): p.read_bytes() for p in opened.workdir.rglob("*") if p.is_file()
            }
            assert extracted == contents
        finally:
            opened.cleanup()


def test_deeply_nested_manifest_is_an_archive_error() -> None:
    with sandbox() as base:
        path = base / "src" / "deep.mar"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST_PATH, "[" * 100_000)
        with pytest.raises(ArchiveError):
            open_archive(path, workdir_root=base / "work", limits=ExtractLimits())


path_fields = st.sampled_from(["serializedFile", "modelFile", "handler", "requirementsFile", "configFile", "extraFiles"])
manifest_paths = st.one_of(paths, st.just(OUTSIDE + "/canary.txt"), st.just("../" * 7 + OUTSIDE.lstrip("/")))


@SETTINGS
@given(st.dictionaries(path_fields, manifest_paths, min_size=1), st.lists(members, max_size=6))
@example({"configFile": OUTSIDE + "/canary.txt"}, [])
@example({"serializedFile": "w"}, [Member("symlink", "w", target=OUTSIDE + "/canary.txt")])
@example({"configFile": "l/canary.txt"}, [Member("symlink", "l", target="../../outside")])
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_manifest_paths_stay_inside_and_refusals_do_not_tell_what_is_outside(
    fields: dict[str, str], entries: list[Member]
) -> None:
    with sandbox() as base:
        outside = base / "outside"
        model = {"modelName": "m", **{field: resolve(value, outside) for field, value in fields.items()}}
        manifest = Member("file", MANIFEST_PATH, json.dumps({"model": model}).encode())
        path = base / "src" / "model.mar"
        if not write_archive(path, "zip", [manifest, *entries], outside):
            return
        outcomes = []
        for present in (True, False):
            if not present:
                (outside / "canary.txt").rename(base / "canary.txt")
            try:
                opened = open_archive(path, workdir_root=base / "work", limits=LIMITS, default_name="m")
            except ArchiveError as exc:
                outcomes.append(str(exc).replace(str(base), "<base>"))
                continue
            try:
                named = [p for _, _, p in manifest_path_entries(opened.manifest)]
                for name in named:
                    found = confined(opened.model_dir, name)
                    assert found is not None and found.is_relative_to(opened.model_dir.resolve()), name
                outcomes.append("opened")
            finally:
                opened.cleanup()
        # Whether a file exists outside the archive never changes the answer.
        assert outcomes[0] == outcomes[1]
