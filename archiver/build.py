"""Building archives: ``.mar`` (deflated or stored zip), ``.tar.gz`` or a plain directory.

Files are streamed straight from their sources into the output, never staged in a temporary
copy, so memory stays flat whatever the size of the weights. The output is written under a
temporary name beside its destination and renamed into place only when complete: a failed
or interrupted run leaves nothing behind.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Literal

from .errors import ArchiveError
from .manifest import MANIFEST_PATH, Manifest, Runtime, check_model_name, new_manifest

ArchiveFormat = Literal["default", "zip-store", "tgz", "no-archive"]
ARCHIVE_FORMATS: tuple[str, ...] = ("default", "zip-store", "tgz", "no-archive")
SUFFIXES = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}

# Handler names torch-model-archiver treats as built-ins: nothing is copied for them.
BUILTIN_HANDLERS = frozenset(
    {
        "base_handler",
        "text_classifier",
        "image_classifier",
        "object_detector",
        "image_segmenter",
        "dali_image_classifier",
        "vllm_handler",
        "trt_llm_handler",
    }
)
_LSP_BUILTIN_HANDLERS = frozenset({"BaseHandler", "TorchScriptHandler"})
_SKIPPED_DIRS = frozenset({"__MACOSX", "__pycache__"})
_CHUNK = 1 << 20
# Entries at least this big are sampled before deflating; see _zip_method.
_SAMPLE = 1 << 20

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ArchiveSpec:
    """What goes into an archive: the torch-model-archiver flags, typed."""

    model_name: str
    version: str
    handler: str
    serialized_file: str | None = None
    model_file: str | None = None
    extra_files: str | None = None
    requirements_file: str | None = None
    config_file: str | None = None
    runtime: Runtime = "python"
    export_path: str = "."
    archive_format: ArchiveFormat = "default"
    force: bool = False

    def output_path(self) -> Path:
        return Path(self.export_path) / f"{self.model_name}{SUFFIXES[self.archive_format]}"

    def manifest(self) -> Manifest:
        return new_manifest(
            model_name=self.model_name,
            handler=os.path.basename(self.handler),
            version=self.version,
            runtime=self.runtime,
            serialized_file=_basename(self.serialized_file),
            model_file=_basename(self.model_file),
            requirements_file=_basename(self.requirements_file),
            config_file=_basename(self.config_file),
        )


def _basename(path: str | None) -> str | None:
    return os.path.basename(path) if path else None


def _handler_source(handler: str, runtime: str) -> str | None:
    """The file a handler string refers to, or None for a built-in handler."""
    module = handler.split(":", 1)[0]
    if runtime == "LSP":
        if handler in _LSP_BUILTIN_HANDLERS:
            return None
        return module + (".dylib" if sys.platform == "darwin" else ".so")
    if handler in BUILTIN_HANDLERS:
        return None
    return module if module.endswith(".py") else module + ".py"


def _readable_file(path: str, what: str) -> Path:
    source = Path(path)
    if not source.exists():
        raise ArchiveError(f"{what} not found: {path}")
    if not source.is_file():
        raise ArchiveError(f"{what} is not a file: {path}")
    try:
        with open(source, "rb"):
            pass
    except OSError as exc:
        raise ArchiveError(f"{what} is not readable: {path}: {exc.strerror}") from None
    return source


def _walk_files(root: Path) -> Iterator[Path]:
    """Files below ``root`` in a stable order, skipping the directories TorchServe skips."""
    seen: set[str] = set()
    for top, dirs, files in os.walk(root, followlinks=True):
        # Following links matches TorchServe (it copies their contents); the real-path set
        # stops a link cycle from walking forever.
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            yield Path(top, name)


def _extra_file_entries(extra_files: str) -> Iterator[tuple[str, Path]]:
    for item in extra_files.split(","):
        pattern = item.strip()
        if not pattern:
            continue
        is_glob = any(ch in pattern for ch in "*?[")
        if not is_glob and not os.path.lexists(pattern):
            raise ArchiveError(f"extra file not found: {pattern}")
        matches = sorted(glob.glob(pattern)) if is_glob else [pattern]
        if not matches:
            print(f"warning: --extra-files pattern matched nothing: {pattern}", file=sys.stderr)
        for match in matches:
            path = Path(match)
            if path.is_dir():
                # A directory contributes its contents, not itself, to the archive root.
                for file in _walk_files(path):
                    yield file.relative_to(path).as_posix(), _readable_file(str(file), "extra file")
            else:
                yield path.name, _readable_file(match, "extra file")


def collect_entries(spec: ArchiveSpec) -> dict[str, Path]:
    """Map each archive member name to its source file.

    The order of precedence is torch-model-archiver's: when two inputs share a name, the later
    of model file, serialized file, handler, extra files, requirements, config file wins.
    """
    entries: dict[str, Path] = {}
    singles = [
        (spec.model_file, "model file"),
        (spec.serialized_file, "serialized file"),
        (_handler_source(spec.handler, spec.runtime), "handler file"),
    ]
    for path, what in singles:
        if path:
            entries[os.path.basename(path)] = _readable_file(path, what)
    if spec.extra_files:
        for name, source in _extra_file_entries(spec.extra_files):
            entries[name] = source
    for path, what in [(spec.requirements_file, "requirements file"), (spec.config_file, "config file")]:
        if path:
            entries[os.path.basename(path)] = _readable_file(path, what)
    # The manifest we write is the archive's only manifest.
    entries.pop(MANIFEST_PATH, None)
    return entries


def build_archive(
    spec: ArchiveSpec, entries: dict[str, Path] | None = None, progress: Progress | None = None
) -> Path:
    """Write the archive described by ``spec`` and return its path.

    ``entries`` is ``collect_entries(spec)`` when the caller already has it. ``progress`` is
    called with the number of source bytes written since its last call.
    """
    check_model_name(spec.model_name)
    if spec.archive_format not in SUFFIXES:
        raise ArchiveError(f"unknown archive format: {spec.archive_format}")
    export = Path(spec.export_path)
    if not export.is_dir():
        raise ArchiveError(f"export path is not a directory: {spec.export_path}")
    output = spec.output_path()
    if os.path.lexists(output) and not spec.force:
        raise ArchiveError(f"{output} already exists; use -f/--force to overwrite it")
    manifest = spec.manifest().to_json()
    if entries is None:
        entries = collect_entries(spec)
    tick = progress or (lambda n: None)
    if spec.archive_format == "no-archive":
        _write_directory(output, entries, manifest, tick)
    else:
        _write_file_atomically(output, entries, manifest, spec, tick)
    return output


def _copy(source: Path, sink: IO[bytes], tick: Progress) -> None:
    with open(source, "rb") as src:
        while chunk := src.read(_CHUNK):
            sink.write(chunk)
            tick(len(chunk))


def _temporary_sibling(output: Path) -> Path:
    return output.with_name(f".{output.name}.{secrets.token_hex(4)}.part")


def _write_file_atomically(
    output: Path, entries: dict[str, Path], manifest: str, spec: ArchiveSpec, tick: Progress
) -> None:
    part = _temporary_sibling(output)
    # O_EXCL: never write through a file or link someone else put there; mode 0o666 honours umask.
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as sink:
            if spec.archive_format == "tgz":
                _write_tgz(sink, spec.model_name, entries, manifest, tick)
            else:
                method = zipfile.ZIP_STORED if spec.archive_format == "zip-store" else zipfile.ZIP_DEFLATED
                _write_zip(sink, method, entries, manifest, tick)
        os.replace(part, output)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _write_zip(sink: BinaryIO, method: int, entries: dict[str, Path], manifest: str, tick: Progress) -> None:
    with zipfile.ZipFile(sink, "w", compression=method, allowZip64=True) as archive:
        for name, source in entries.items():
            info = zipfile.ZipInfo.from_file(source, name)
            info.compress_type = _zip_method(source, method)
            with archive.open(info, "w") as member:
                _copy(source, member, tick)
        archive.writestr(MANIFEST_PATH, manifest)


def _zip_method(source: Path, method: int) -> int:
    # Deflating data that does not shrink (random, quantised or already compressed weights)
    # spends most of the archiving time for nothing. Such entries are stored instead, which
    # every zip reader, TorchServe's included, accepts inside a deflated archive.
    if method != zipfile.ZIP_DEFLATED or source.stat().st_size < _SAMPLE:
        return method
    with open(source, "rb") as src:
        sample = src.read(_SAMPLE)
    return zipfile.ZIP_STORED if len(zlib.compress(sample, 1)) > 0.97 * len(sample) else method


def _write_tgz(sink: BinaryIO, top: str, entries: dict[str, Path], manifest: str, tick: Progress) -> None:
    # Level 6 instead of tarfile's default 9: weights barely compress, and 9 is much slower.
    with tarfile.open(fileobj=sink, mode="w:gz", compresslevel=6) as archive:
        for name, source in entries.items():
            with open(source, "rb") as src:
                info = archive.gettarinfo(arcname=f"{top}/{name}", fileobj=src)
                archive.addfile(info, _CountingReader(src, tick))
        data = manifest.encode()
        info = tarfile.TarInfo(f"{top}/{MANIFEST_PATH}")
        info.size = len(data)
        info.mode = 0o644
        archive.addfile(info, _BytesReader(data))


class _CountingReader:
    """A read-only file wrapper that reports progress as tarfile pulls data through it."""

    def __init__(self, src: BinaryIO, tick: Progress) -> None:
        self._src = src
        self._tick = tick

    def read(self, size: int = -1) -> bytes:
        chunk = self._src.read(size)
        self._tick(len(chunk))
        return chunk


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read(self, size: int = -1) -> bytes:
        size = len(self._data) if size < 0 else size
        chunk, self._data = self._data[:size], self._data[size:]
        return bytes(chunk)


def _write_directory(output: Path, entries: dict[str, Path], manifest: str, tick: Progress) -> None:
    part = _temporary_sibling(output)
    part.mkdir()
    try:
        for name, source in entries.items():
            target = part / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as sink:
                _copy(source, sink, tick)
            shutil.copymode(source, target)
        (part / MANIFEST_PATH).parent.mkdir(exist_ok=True)
        (part / MANIFEST_PATH).write_text(manifest)
        _replace_directory(part, output)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise


def _replace_directory(new: Path, output: Path) -> None:
    # A directory cannot be swapped in one rename: move the old one aside first, so the
    # destination is either the old tree or the complete new one, never a half-written mix.
    old = None
    if os.path.lexists(output):
        old = _temporary_sibling(output)
        os.replace(output, old)
    os.replace(new, output)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
