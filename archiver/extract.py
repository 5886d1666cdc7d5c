"""Opening model archives safely: ``.mar`` (zip), ``.tar.gz`` and plain directories.

An archive is untrusted input. Extraction never writes outside its private directory:
every member path is checked after resolution (not by string prefix), links are created
only after every regular file is written and must resolve inside the directory, special
files are refused, and the number of entries and the bytes actually written are capped.
Each refusal is an ArchiveError naming the archive and the offending entry. Once an archive
is open, every path its manifest names must resolve inside it too (``archiver.paths``).
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from .errors import ArchiveError, one_line
from .manifest import MANIFEST_PATH, Manifest, ModelSection, check_model_name, parse_manifest
from .paths import DRIVE, archive_path, check_manifest_file, check_manifest_paths, is_inside

_CHUNK = 1 << 20
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_LINK_BYTES = 4096
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".mar", ".model")


@dataclass(frozen=True)
class ExtractLimits:
    """Caps that keep a hostile archive (a zip bomb, a million tiny files) from filling the disk."""

    max_bytes: int = 32 << 30
    max_entries: int = 10_000


@dataclass(frozen=True)
class ModelArchive:
    """An opened archive: its manifest and the directory the handler will run in."""

    manifest: Manifest
    model_dir: Path
    # The private directory this archive was extracted into; None when a directory is used in place.
    workdir: Path | None = None

    def path(self, field: str, entry: str) -> Path:
        """The file the manifest's ``field`` names with ``entry``, resolved inside the archive;
        ArchiveError if it lies outside (see ``archiver.paths``)."""
        return archive_path(self.model_dir, entry, field)

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def model_name_from_path(source: str | os.PathLike[str]) -> str:
    """TorchServe's fallback model name: the file name without its archive suffix."""
    name = Path(source).name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_archive(
    source: str | os.PathLike[str],
    *,
    workdir_root: str | os.PathLike[str] | None = None,
    limits: ExtractLimits = ExtractLimits(),
    default_name: str | None = None,
) -> ModelArchive:
    """Open ``source``, extracting it into a new private (0700) directory under ``workdir_root``.

    A directory is used in place. ``default_name`` names a model whose archive has no
    manifest (TorchServe accepts those); it defaults to the file name. Every path the manifest
    names must lie inside the archive (``archiver.paths``), or this raises ArchiveError.
    """
    path = Path(source)
    fallback = default_name or model_name_from_path(path)
    if path.is_dir():
        model_dir = _model_root(path)
        return ModelArchive(_confined_manifest(model_dir, fallback), model_dir)
    if not path.is_file():
        raise ArchiveError(f"model archive not found: {path}")
    workdir = Path(tempfile.mkdtemp(prefix="marserve-model-", dir=workdir_root))
    try:
        extract(path, workdir, limits)
        model_dir = _model_root(workdir)
        return ModelArchive(_confined_manifest(model_dir, fallback), model_dir, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _confined_manifest(model_dir: Path, default_name: str) -> Manifest:
    manifest = read_manifest(model_dir, default_name)
    check_manifest_paths(manifest, model_dir)
    return manifest


def read_manifest(model_dir: Path, default_name: str | None = None) -> Manifest:
    """The manifest of an extracted archive; without one, a minimal manifest named ``default_name``.

    The manifest itself must lie inside ``model_dir`` (a directory archive's may be a link); the
    paths it names are checked by ``archiver.paths.check_manifest_paths``.
    """
    check_manifest_file(model_dir)
    path = model_dir / MANIFEST_PATH
    if not path.is_file():
        if not default_name:
            raise ArchiveError(f"{model_dir}: no {MANIFEST_PATH} and no model name given")
        return Manifest(model=ModelSection(modelName=check_model_name(default_name)))
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{MANIFEST_PATH} is larger than {_MAX_MANIFEST_BYTES} bytes")
    return parse_manifest(path.read_bytes())


def _model_root(directory: Path) -> Path:
    # TorchServe's rule, which also strips the top folder of a .tar.gz made with --archive-format tgz:
    # a directory holding nothing but one sub-directory stands for that sub-directory.
    # lexists: a manifest that is a link, dangling or not, is this directory's (and is then refused
    # if it leads out), so which directory is the model's never depends on what lies outside.
    if os.path.lexists(directory / MANIFEST_PATH):
        return directory
    children = list(directory.iterdir())
    if len(children) == 1 and children[0].is_dir() and not children[0].is_symlink():
        return children[0]
    return directory


# -- extraction ------------------------------------------------------------------------------

Kind = Literal["file", "dir", "symlink", "hardlink"]


@dataclass
class _Entry:
    name: str
    kind: Kind
    size: int
    open: Callable[[], IO[bytes]]
    link: str = ""


def extract(source: Path, dest: Path, limits: ExtractLimits = ExtractLimits()) -> None:
    """Extract the zip or tar archive ``source`` into the existing directory ``dest``."""
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as archive:
                _extract_entries(source, _zip_entries(archive), dest, limits)
        elif _is_tar(source):
            with tarfile.open(source) as archive:
                _extract_entries(source, _tar_entries(archive), dest, limits)
        else:
            raise ArchiveError(f"{source.name}: not a model archive (expected a .mar zip, a .tar.gz or a directory)")
    # UnicodeDecodeError: a damaged zip entry name flagged as UTF-8 that is not.
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, NotImplementedError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{source.name}: corrupt archive: {one_line(exc)}") from None


def _is_tar(source: Path) -> bool:
    try:
        return tarfile.is_tarfile(source)
    except (OSError, EOFError, zlib.error):
        return False


def _zip_entries(archive: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if info.flag_bits & 0x1:
            raise ArchiveError(f"entry {info.filename!r} is encrypted")
        opener = lambda info=info: archive.open(info)  # noqa: E731
        if stat.S_ISLNK(mode):
            yield _Entry(info.filename, "symlink", 0, opener, _read_link(opener, info.filename))
        # Not info.is_dir(): it fails on an empty name (one that began with a NUL byte).
        elif info.filename.endswith("/"):
            yield _Entry(info.filename, "dir", 0, opener)
        elif mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise ArchiveError(f"entry {info.filename!r} is a special file")
        else:
            yield _Entry(info.filename, "file", info.file_size, opener)


def _read_link(opener: Callable[[], IO[bytes]], name: str) -> str:
    with opener() as member:
        target = member.read(_MAX_LINK_BYTES + 1)
    if len(target) > _MAX_LINK_BYTES:
        raise ArchiveError(f"entry {name!r} is a link with an overlong target")
    return target.decode("utf-8", "replace")


def _tar_entries(archive: tarfile.TarFile) -> Iterator[_Entry]:
    for member in archive:
        opener = lambda member=member: archive.extractfile(member)  # noqa: E731
        if member.isreg():
            yield _Entry(member.name, "file", member.size, opener)  # type: ignore[arg-type]
        elif member.isdir():
            yield _Entry(member.name, "dir", 0, opener)  # type: ignore[arg-type]
        elif member.issym():
            yield _Entry(member.name, "symlink", 0, opener, member.linkname)  # type: ignore[arg-type]
        elif member.islnk():
            yield _Entry(member.name, "hardlink", 0, opener, member.linkname)  # type: ignore[arg-type]
        else:
            raise ArchiveError(f"entry {member.name!r} is a special file")


def _extract_entries(source: Path, entries: Iterator[_Entry], dest: Path, limits: ExtractLimits) -> None:
    root = dest.resolve()
    links: list[tuple[_Entry, Path]] = []
    count = 0
    written = 0
    try:
        for entry in entries:
            count += 1
            if count > limits.max_entries:
                raise ArchiveError(f"entry {entry.name!r}: more than {limits.max_entries} entries")
            target = _member_path(root, entry.name)
            if target == root:
                continue
            if entry.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif entry.kind == "file":
                if written + entry.size > limits.max_bytes:
                    raise _too_big(entry, limits)
                written = _write_member(entry, target, written, limits)
            else:
                # Links wait until every file is written, so no write can ever pass through one.
                links.append((entry, target))
        for entry, target in links:
            _make_link(root, entry, target)
        # Re-checked once all exist: a link that was harmless when made can escape through a
        # link made after it (x -> y/.., then y -> .).
        for entry, target in links:
            _check_inside(root, entry, target)
    except ArchiveError as exc:
        raise ArchiveError(f"{source.name}: {exc}") from None
    except OSError as exc:
        where = entry.name if count else source.name
        raise ArchiveError(f"{source.name}: entry {where!r}: {exc.strerror or exc}") from None


def _too_big(entry: _Entry, limits: ExtractLimits) -> ArchiveError:
    return ArchiveError(f"entry {entry.name!r}: archive expands beyond the {limits.max_bytes}-byte limit")


def _member_path(root: Path, name: str) -> Path:
    if "\x00" in name:
        raise ArchiveError(f"entry {name!r} has a NUL byte in its name")
    if name.startswith(("/", "\\")) or DRIVE.match(name):
        raise ArchiveError(f"entry {name!r} has an absolute path")
    parts = [part for part in PurePosixPath(name).parts if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"entry {name!r} points outside the archive (..)")
    target = root.joinpath(*parts)
    # Resolution follows anything already on disk, so the check holds whatever came before.
    if not is_inside(target, root):
        raise ArchiveError(f"entry {name!r} resolves outside the extraction directory")
    return target


def _write_member(entry: _Entry, target: Path, written: int, limits: ExtractLimits) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as sink, entry.open() as member:
        # Count what is actually inflated: a zip's declared sizes can lie.
        while chunk := member.read(_CHUNK):
            written += len(chunk)
            if written > limits.max_bytes:
                raise _too_big(entry, limits)
            sink.write(chunk)
    return written


def _make_link(root: Path, entry: _Entry, target: Path) -> None:
    if entry.kind == "hardlink":
        # A tar hard link names another member; copying it keeps the tree free of shared inodes.
        try:
            origin = _member_path(root, entry.link)
        except ArchiveError:
            raise ArchiveError(f"entry {entry.name!r} is a link that points outside the archive") from None
        if not origin.is_file():
            raise ArchiveError(f"entry {entry.name!r} links to a missing member {entry.link!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, target, follow_symlinks=False)
        return
    if entry.link.startswith(("/", "\\")) or DRIVE.match(entry.link):
        raise ArchiveError(f"entry {entry.name!r} is a link to an absolute path")
    if "\x00" in entry.link:
        raise ArchiveError(f"entry {entry.name!r} is a link with a NUL byte in its target")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(entry.link, target)
    _check_inside(root, entry, target)


def _check_inside(root: Path, entry: _Entry, target: Path) -> None:
    if not is_inside(target, root):
        raise ArchiveError(f"entry {entry.name!r} is a link that points outside the archive")
