"""Every path a manifest names must lie inside its archive (``archiver.paths``).

The archives here are written by hand: model-archiver never writes such manifests, a hostile
archive can. A refusal names the field and the entry, and is the same whether or not the
outside path exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from archiver import MANIFEST_PATH, ArchiveError, archive_path, handler_module, open_archive
from archiver.paths import confined, handler_paths
from tests.conftest import zip_archive

LABELS = {
    "serializedFile": "serialized file",
    "modelFile": "model file",
    "handler": "handler",
    "requirementsFile": "requirements file",
    "configFile": "model config file",
    "extraFiles": "extra file",
}


def manifest(**model: object) -> str:
    return json.dumps({"runtime": "python", "model": {"modelName": "m", "modelVersion": "1.0", **model}})


def refusal(archive: Path, work: Path) -> str:
    work.mkdir(exist_ok=True)
    with pytest.raises(ArchiveError) as caught:
        open_archive(archive, workdir_root=work)
    # A refused archive leaves no extraction directory behind.
    assert list(work.iterdir()) == []
    return str(caught.value)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret.txt").write_text("secret")
    return directory


def hostile_entries(outside: Path) -> list[str]:
    return [str(outside / "secret.txt"), "../../outside/secret.txt", "sub/../../x", "\\etc\\passwd", "C:/x"]


@pytest.mark.parametrize("field", list(LABELS))
def test_every_manifest_path_outside_the_archive_is_refused(tmp_path: Path, outside: Path, field: str) -> None:
    for i, entry in enumerate(hostile_entries(outside)):
        if field == "handler" and entry == "C:/x":
            continue  # a handler's module is what comes before the first ":": here "C", a module name
        value = entry + ":handle" if field == "handler" else entry
        archive = zip_archive(tmp_path / f"m{i}.mar", ("h.py", b""), manifest=manifest(**{field: value}))
        assert refusal(archive, tmp_path / "work") == f"{LABELS[field]} is outside the archive: {value}"


@pytest.mark.parametrize("field", list(LABELS))
def test_the_refusal_does_not_say_whether_the_outside_path_exists(tmp_path: Path, outside: Path, field: str) -> None:
    secret = outside / "secret.txt"
    messages = []
    for entry in (str(secret), "../" * 8 + str(secret).lstrip("/")):
        archive = zip_archive(tmp_path / "m.mar", manifest=manifest(**{field: entry}))
        present = refusal(archive, tmp_path / "work")
        secret.rename(outside / "moved")
        absent = refusal(archive, tmp_path / "work")
        (outside / "moved").rename(secret)
        assert present == absent
        messages.append(present)
    assert messages == [f"{LABELS[field]} is outside the archive: {entry}" for entry in (
        str(secret), "../" * 8 + str(secret).lstrip("/"))]  # fmt: skip


def test_extra_files_are_checked_one_by_one(tmp_path: Path) -> None:
    for i, value in enumerate(["a.json, ../b.json", ["a.json", "/etc/hosts"]]):
        archive = zip_archive(tmp_path / f"m{i}.mar", ("a.json", b"{}"), manifest=manifest(extraFiles=value))
        bad = " ../b.json" if isinstance(value, str) else "/etc/hosts"
        assert refusal(archive, tmp_path / "work") == f"extra file is outside the archive: {bad}"


def test_an_unprintable_entry_is_shown_quoted_on_one_line(tmp_path: Path) -> None:
    archive = zip_archive(tmp_path / "m.mar", manifest=manifest(configFile="/etc/x\nfake: line"))
    assert refusal(archive, tmp_path / "work") == "model config file is outside the archive: '/etc/x\\nfake: line'"


def test_a_valid_archive_opens_and_its_paths_resolve_inside(tmp_path: Path) -> None:
    archive = zip_archive(
        tmp_path / "m.mar",
        ("h.py", b""), ("weights.pt", b"w"), ("model.py", b""), ("conf/model-config.yaml", b"batchSize: 2\n"),
        ("requirements.txt", b""), ("a.json", b"{}"),
        manifest=manifest(
            handler="h.py:handle", serializedFile="weights.pt", modelFile="./model.py",
            configFile="conf/model-config.yaml", requirementsFile="requirements.txt", extraFiles="a.json",
        ),
        symlinks={"linked.yaml": "conf/model-config.yaml"},
    )  # fmt: skip
    opened = open_archive(archive, workdir_root=tmp_path)
    try:
        assert opened.path("configFile", "conf/model-config.yaml").read_text() == "batchSize: 2\n"
        # A link inside the archive is followed, and stays inside.
        assert opened.path("configFile", "linked.yaml") == (opened.model_dir / "conf/model-config.yaml").resolve()
        with pytest.raises(ArchiveError, match="^model config file is outside the archive: ../x$"):
            opened.path("configFile", "../x")
    finally:
        opened.cleanup()


@pytest.mark.parametrize(
    "handler", ["image_classifier", "h", "h.py", "h.py:handle", "h:handle", "ts.torch_handler.base_handler", "sub/h.py"]
)
def test_handlers_that_name_no_outside_path_are_accepted(tmp_path: Path, handler: str) -> None:
    archive = zip_archive(tmp_path / "m.mar", ("h.py", b""), manifest=manifest(handler=handler))
    open_archive(archive, workdir_root=tmp_path).cleanup()


def model_directory(store: Path, outside: Path, **model: object) -> Path:
    directory = store / "dirmodel"
    (directory / "MAR-INF").mkdir(parents=True)
    (directory / MANIFEST_PATH).write_text(manifest(**model))
    (directory / "h.py").write_text("")
    return directory


@pytest.mark.parametrize(
    ("field", "value", "link", "target"),
    [
        ("configFile", "config.yaml", "config.yaml", "secret.txt"),
        ("serializedFile", "weights.pt", "weights.pt", "secret.txt"),
        ("modelFile", "model.py", "model.py", "secret.txt"),
        ("requirementsFile", "requirements.txt", "requirements.txt", "missing.txt"),
        ("configFile", "conf/config.yaml", "conf", "."),  # a directory link on the way
        ("handler", "evil.py", "evil.py", "secret.txt"),
        # A module name is imported from the archive's directory: its file there must not lead out.
        ("handler", "evil", "evil.py", "secret.txt"),
        ("handler", "evil:handle", "evil", "."),
        ("handler", "pkg.evil", "pkg", "."),
    ],
)
def test_links_out_of_a_directory_archive_are_refused(
    tmp_path: Path, outside: Path, field: str, value: str, link: str, target: str
) -> None:
    directory = model_directory(tmp_path / "store", outside, **{field: value})
    os.symlink(outside / target, directory / link)
    with pytest.raises(ArchiveError) as caught:
        open_archive(directory)
    assert str(caught.value) == f"{LABELS[field]} is outside the archive: {value}"


def test_a_link_that_leaves_and_comes_back_is_refused(tmp_path: Path, outside: Path) -> None:
    directory = model_directory(tmp_path / "store", outside, configFile="out/back/config.yaml")
    (directory / "config.yaml").write_text("batchSize: 1\n")
    os.symlink(outside, directory / "out")
    os.symlink(directory, outside / "back")
    with pytest.raises(ArchiveError, match="^model config file is outside the archive: out/back/config.yaml$"):
        open_archive(directory)


@pytest.mark.parametrize("linked", ["file", "directory"])
@pytest.mark.parametrize("exists", [True, False])
def test_a_directory_archive_whose_manifest_leads_out_is_refused(
    tmp_path: Path, outside: Path, linked: str, exists: bool
) -> None:
    directory = tmp_path / "store" / "dirmodel"
    directory.mkdir(parents=True)
    (directory / "h.py").write_text("")
    (outside / "MAR-INF").mkdir()
    if exists:
        (outside / MANIFEST_PATH).write_text(manifest(handler="h.py"))
    if linked == "file":
        (directory / "MAR-INF").mkdir()
        os.symlink(outside / MANIFEST_PATH, directory / MANIFEST_PATH)
    else:
        os.symlink(outside / "MAR-INF", directory / "MAR-INF")
    with pytest.raises(ArchiveError) as caught:
        open_archive(directory)
    assert str(caught.value) == f"manifest is outside the archive: {MANIFEST_PATH}"


def test_a_directory_archive_with_links_inside_opens(tmp_path: Path, outside: Path) -> None:
    directory = model_directory(tmp_path / "store", outside, configFile="config.yaml", serializedFile="w/weights.pt")
    (directory / "real").mkdir()
    (directory / "real" / "config.yaml").write_text("batchSize: 1\n")
    (directory / "real" / "weights.pt").write_bytes(b"w")
    os.symlink("real/config.yaml", directory / "config.yaml")
    os.symlink("real", directory / "w")
    opened = open_archive(directory)
    assert opened.workdir is None
    assert opened.path("configFile", "config.yaml").read_text() == "batchSize: 1\n"


def test_confined_resolves_inside_or_says_none(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert confined(root, "a/b.txt") == root.resolve() / "a" / "b.txt"
    assert confined(root, "./a//b.txt") == root.resolve() / "a" / "b.txt"
    assert confined(root, ".") == root.resolve()
    for entry in ("/etc/passwd", "../x", "a/../../x", "a/../b", "\\x", "C:x", "a\x00b"):
        assert confined(root, entry) is None, entry
    os.symlink("a", root / "loop1")
    os.symlink("loop2", root / "loop3")
    os.symlink("loop3", root / "loop2")
    assert confined(root, "loop2/x") is None
    with pytest.raises(ArchiveError, match="^requirements file is outside the archive: ../r.txt$"):
        archive_path(root, "../r.txt", "requirementsFile")


@pytest.mark.parametrize(
    ("handler", "module", "paths"),
    [
        ("image_classifier", ("image_classifier", ""), ["image_classifier.py", "image_classifier"]),
        ("h.py", ("h", ""), ["h.py", "h.py", "h"]),
        ("h.py:fn", ("h", "fn"), ["h.py", "h.py", "h"]),
        ("h:fn", ("h", "fn"), ["h.py", "h"]),
        ("sub/h.py", ("h", ""), ["sub/h.py", "h.py", "h"]),
        ("/abs/h.py:fn", ("h", "fn"), ["/abs/h.py", "h.py", "h"]),
        ("a.b", ("a.b", ""), ["a/b.py", "a/b"]),
        ("..x", ("..x", ""), []),
    ],
)
def test_handler_paths(handler: str, module: tuple[str, str], paths: list[str]) -> None:
    assert handler_module(handler) == module
    assert handler_paths(handler) == paths
