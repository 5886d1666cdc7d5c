"""Registering an archive whose manifest names a path outside it is a 400 that names the field,
and the frontend reads nothing outside the archive: an attack run found ``"configFile":
"/etc/shadow"`` handed whole to the handler, and "not found" telling whether a file exists."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from archiver import MANIFEST_PATH, handler_module
from server.workers.child.loader import handler_module as worker_handler_module
from tests.conftest import Server, ServerFactory, make_mar, zip_archive

LABELS = {
    "serializedFile": "serialized file",
    "modelFile": "model file",
    "handler": "handler",
    "requirementsFile": "requirements file",
    "configFile": "model config file",
    "extraFiles": "extra file",
}

YAML_HANDLER = '''"""Answers with the model YAML the frontend handed over."""

import json


def handle(data, context):
    if data is None:
        return None
    return [json.dumps(context.model_yaml_config, sort_keys=True) for _ in data]
'''


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    return start_module_server()


@pytest.fixture(scope="module")
def outside(srv: Server) -> Path:
    """A directory beside the server's, with a file that must never be read."""
    directory = srv.root.parent / f"outside-{srv.root.name}"
    directory.mkdir()
    (directory / "secret.yaml").write_text("secret: the-whole-file\n")
    return directory


_names = iter(range(10_000))


def hostile(srv: Server, **model: object) -> str:
    """A hand-written archive in the store with this manifest ``model`` section; its file name."""
    name = f"hostile{next(_names)}.mar"
    manifest = json.dumps({"runtime": "python", "model": {"modelName": "hostile", "modelVersion": "1.0", **model}})
    zip_archive(srv.store / name, ("h.py", b"def handle(data, context):\n    return data\n"), manifest=manifest)
    return name


def refused(srv: Server, url: str) -> str:
    reply = srv.register(url, initial_workers=0)
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert body["code"] == 400 and body["type"] == "InvalidModelException", body
    assert srv.http.get(f"{srv.management}/models").json() == {"models": []}
    return str(body["message"])


def entries(outside: Path) -> list[str]:
    secret = str(outside / "secret.yaml")
    return [secret, "../" * 12 + secret.lstrip("/"), "../secret.yaml"]


@pytest.mark.parametrize("field", list(LABELS))
def test_a_manifest_path_outside_the_archive_is_a_400_naming_the_field(srv: Server, outside: Path, field: str) -> None:
    for entry in entries(outside):
        assert refused(srv, hostile(srv, **{field: entry})) == f"{LABELS[field]} is outside the archive: {entry}"
    # Nothing of the refused archives is left in the server's working directory.
    assert list(srv.tmp.glob("marserve-*/marserve-model-*")) == []


@pytest.mark.parametrize("field", list(LABELS))
def test_the_answer_is_the_same_whether_the_outside_path_exists_or_not(
    srv: Server, outside: Path, field: str
) -> None:
    secret = outside / "secret.yaml"
    for entry in entries(outside)[:2]:
        url = hostile(srv, **{field: entry})
        present = refused(srv, url)
        secret.rename(outside / "moved")
        try:
            absent = refused(srv, url)
        finally:
            (outside / "moved").rename(secret)
        assert present == absent == f"{LABELS[field]} is outside the archive: {entry}"


def test_the_frontend_never_reads_an_outside_config_file(srv: Server, outside: Path) -> None:
    # The attack as it was run: the file's contents reached the handler as model_yaml_config.
    message = refused(srv, hostile(srv, handler="h.py", configFile=str(outside / "secret.yaml")))
    assert "the-whole-file" not in message and "not found" not in message


def directory_model(srv: Server, name: str, **model: object) -> Path:
    directory = srv.store / name
    (directory / "MAR-INF").mkdir(parents=True)
    manifest = {"runtime": "python", "model": {"modelName": name, "modelVersion": "1.0", "handler": "h.py", **model}}
    (directory / MANIFEST_PATH).write_text(json.dumps(manifest))
    (directory / "h.py").write_text("def handle(data, context):\n    return data\n")
    return directory


@pytest.mark.parametrize(
    ("field", "value", "link", "exists"),
    [
        ("configFile", "config.yaml", "config.yaml", True),
        ("configFile", "config.yaml", "config.yaml", False),
        ("serializedFile", "weights.pt", "weights.pt", True),
        ("modelFile", "model.py", "model.py", True),
        ("requirementsFile", "requirements.txt", "requirements.txt", True),
        ("extraFiles", "index_to_name.json", "index_to_name.json", True),
        ("handler", "evil.py", "evil.py", True),
        ("handler", "evil:handle", "evil.py", False),
    ],
)
def test_a_link_out_of_a_directory_archive_is_a_400(
    srv: Server, outside: Path, field: str, value: str, link: str, exists: bool
) -> None:
    name = f"dir{next(_names)}"
    directory = directory_model(srv, name, **{field: value})
    target = outside / ("secret.yaml" if exists else "missing.yaml")
    os.symlink(target, directory / link)
    assert refused(srv, name) == f"{LABELS[field]} is outside the archive: {value}"
    # The directory is used in place and left as it was.
    assert os.readlink(directory / link) == str(target)


def test_a_directory_archive_whose_manifest_is_a_link_out_is_a_400(srv: Server, outside: Path) -> None:
    name = f"dir{next(_names)}"
    directory = srv.store / name
    (directory / "MAR-INF").mkdir(parents=True)
    os.symlink(outside / "secret.yaml", directory / MANIFEST_PATH)
    assert refused(srv, name) == f"manifest is outside the archive: {MANIFEST_PATH}"


def test_a_valid_config_file_still_reaches_the_handler(start_server: ServerFactory, tmp_path: Path) -> None:
    srv = start_server(root=tmp_path / "server")
    handler = tmp_path / "yaml_handler.py"
    handler.write_text(YAML_HANDLER)
    config = tmp_path / "model-config.yaml"
    config.write_text("minWorkers: 1\nhandler:\n  greeting: hello\n")
    make_mar(srv.store, "yamlmodel", str(handler), config_file=str(config))
    reply = srv.register("yamlmodel.mar", initial_workers=1)
    assert reply.status_code == 200, reply.text
    answer = srv.predict("yamlmodel")
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.text) == {"handler": {"greeting": "hello"}, "minWorkers": 1}


def test_a_valid_directory_archive_with_links_inside_registers(start_server: ServerFactory, tmp_path: Path) -> None:
    srv = start_server(root=tmp_path / "server")
    handler = tmp_path / "yaml_handler.py"
    handler.write_text(YAML_HANDLER)
    config = tmp_path / "model-config.yaml"
    config.write_text("handler:\n  greeting: linked\n")
    mar = make_mar(tmp_path, "linked", str(handler), config_file=str(config))
    directory = srv.store / "linked"
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(directory)
    (directory / "conf").mkdir()
    (directory / "model-config.yaml").rename(directory / "conf" / "model-config.yaml")
    os.symlink("conf/model-config.yaml", directory / "model-config.yaml")
    reply = srv.register("linked", initial_workers=1)
    assert reply.status_code == 200, reply.text
    assert json.loads(srv.predict("linked").text) == {"handler": {"greeting": "linked"}}


@pytest.mark.parametrize(
    "handler",
    ["image_classifier", "h", "h.py", "h.py:fn", "h:fn", "sub/dir/h.py", "/abs/h.py:fn", "a.b", "a.b.py", ":fn", ""],
)
def test_the_frontend_and_the_worker_read_a_handler_alike(handler: str) -> None:
    # The frontend confines the files a handler names with archiver's reading of it, the worker
    # imports by its own: they must agree on which module that is.
    assert handler_module(handler) == worker_handler_module(handler)
