"""Confining the paths an archive names to the archive.

A manifest is untrusted: ``"configFile": "/etc/shadow"`` must not make the server read
``/etc/shadow``, and a ``../`` path, or a link in a directory archive, must not lead out either.
Every path the manifest names (and the manifest itself) is checked here, in one place, when the
archive is opened and before any of those files is read: it must be relative, have no ``..``
part, and resolve (links followed, at each step) inside the archive's directory. A refusal is
an ArchiveError that names the field and the entry, and says nothing more: the message is the
same whether or not the outside path exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .errors import ArchiveError
from .manifest import MANIFEST_PATH, Manifest

DRIVE = re.compile(r"^[A-Za-z]:")

#: The manifest's path fields (its ``model`` object's keys), each with the name a message gives it.
PATH_FIELDS = {
    "serializedFile": "serialized file",
    "modelFile": "model file",
    "handler": "handler",
    "requirementsFile": "requirements file",
    "configFile": "model config file",
    "extraFiles": "extra file",
}
_MANIFEST_LABEL = "manifest"


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, resolved with every link on disk followed, lies in the resolved ``root``."""
    try:
        return path.resolve().is_relative_to(root)
    except (RuntimeError, OSError, ValueError):  # a link loop (3.11: RuntimeError, 3.13: OSError); a NUL byte
        return False


def confined(root: Path, entry: str) -> Path | None:
    """``entry`` (an archive-relative path) resolved inside ``root``; None when it is absolute,
    has a ``..`` part, or it or any directory on its way resolves outside ``root``.

    Each step is resolved and checked, so a path cannot leave through a link and come back:
    whether it is refused never depends on what lies outside the archive.
    """
    if "\x00" in entry or entry.startswith(("/", "\\")) or DRIVE.match(entry):
        return None
    parts = [part for part in PurePosixPath(entry).parts if part not in ("", ".")]
    if ".." in parts:
        return None
    top = root.resolve()
    path = top
    for part in parts:
        path = path / part
        if not is_inside(path, top):
            return None
    return path.resolve()


def archive_path(root: Path, entry: str, field: str) -> Path:
    """The file the manifest's ``field`` names with ``entry``, inside ``root``; ArchiveError if it is not."""
    path = confined(root, entry)
    if path is None:
        raise outside_error(field, entry)
    return path


def outside_error(field: str, entry: str) -> ArchiveError:
    label = PATH_FIELDS.get(field, field)
    shown = entry if entry.isprintable() else repr(entry)
    return ArchiveError(f"{label} is outside the archive: {shown}")


def check_manifest_file(model_dir: Path) -> None:
    """The manifest itself (which may be a link in a directory archive) lies inside ``model_dir``."""
    if confined(model_dir, MANIFEST_PATH) is None:
        raise outside_error(_MANIFEST_LABEL, MANIFEST_PATH)


def manifest_paths(manifest: Manifest) -> Iterator[tuple[str, str, str]]:
    """``(field, entry, path)`` for every file path the manifest names: ``entry`` as the manifest
    has it, ``path`` the archive-relative path to check. A handler names files only as the
    worker resolves it (``server/workers/child/loader.py``): see ``handler_paths``."""
    model = manifest.model
    for field, entry in (
        ("serializedFile", model.serialized_file),
        ("modelFile", model.model_file),
        ("requirementsFile", model.requirements_file),
        ("configFile", model.config_file),
    ):
        if entry:
            yield field, entry, entry
    if model.handler:
        for path in handler_paths(model.handler):
            yield "handler", model.handler, path
    extra = model.extra_files
    for entry in extra.split(",") if isinstance(extra, str) else extra or []:
        if entry.strip():
            yield "extraFiles", entry, entry.strip()


def check_manifest_paths(manifest: Manifest, model_dir: Path) -> None:
    """Every path the manifest names resolves inside ``model_dir``; else ArchiveError naming the field."""
    for field, entry, path in manifest_paths(manifest):
        if confined(model_dir, path) is None:
            raise outside_error(field, entry)


def handler_module(handler: str) -> tuple[str, str]:
    """``(module, function)`` as the worker imports a handler: ``module[.py][:function]``, where
    only the last ``/`` part of the module counts (TorchServe's rule). ``function`` may be ""."""
    module_part, _, function = handler.partition(":")
    module = module_part.rsplit("/", 1)[-1]
    return module.removesuffix(".py"), function


def handler_paths(handler: str) -> list[str]:
    """The archive paths a handler string stands for: its module part as written when that is a
    file path (it has a slash or a backslash, or ends in ``.py``), and the module file and package
    the worker imports from the archive's directory (first on its ``sys.path``). A built-in name
    such as ``image_classifier`` or a ``module:function`` names no path of its own, but its
    would-be files in the archive, absent from a normal one, must still not be links that lead out.
    """
    module_part = handler.partition(":")[0]
    is_path = "/" in module_part or "\\" in module_part or module_part.endswith(".py")
    paths = [module_part] if is_path else []
    module, _ = handler_module(handler)
    dotted = module.split(".")
    if module and all(part.isidentifier() for part in dotted):
        package = "/".join(dotted)
        paths += [f"{package}.py", package]
    return paths
