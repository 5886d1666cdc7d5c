"""Per-model Python dependencies (``install_py_dep_per_model``) against a real server and real pip.

No network is available to tests: the archive carries a tiny wheel, made here by hand, and its
requirements file installs it with ``--no-index``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import zipfile
from pathlib import Path

import pytest

from tests.conftest import Server, ServerFactory, make_mar

PACKAGE = "marserve_tinydep"
WHEEL = f"{PACKAGE}-1.0-py3-none-any.whl"

HANDLER = f'''"""Answers with a value from a package that only the model's requirements provide."""

import {PACKAGE}


def handle(data, context):
    if data is None:
        return None
    return [{PACKAGE}.VALUE for _ in data]
'''


def make_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel: a zip of the package and its .dist-info (METADATA, WHEEL, RECORD)."""
    dist_info = f"{PACKAGE}-1.0.dist-info"
    files = {
        f"{PACKAGE}/__init__.py": b'VALUE = "from the model\'s own wheel"\n',
        f"{dist_info}/METADATA": b"Metadata-Version: 2.1\nName: marserve-tinydep\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: marserve-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(content)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / WHEEL
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return wheel


def make_dep_mar(store: Path, staging: Path, name: str, requirements: str) -> Path:
    """An archive whose handler imports PACKAGE, carrying the wheel and this requirements file."""
    staging.mkdir(parents=True, exist_ok=True)
    handler = staging / "dep_handler.py"
    handler.write_text(HANDLER)
    requirements_file = staging / "requirements.txt"
    requirements_file.write_text(requirements)
    wheel = make_wheel(staging)
    return make_mar(
        store, name, str(handler), requirements_file=str(requirements_file), extra_files=str(wheel)
    )


# pip reads relative paths from where it runs: the model's directory.
INSTALLABLE = f"--no-index\n./{WHEEL}\n"


@pytest.fixture
def installing(start_server: ServerFactory, tmp_path: Path) -> Server:
    return start_server("install_py_dep_per_model=true\n", root=tmp_path)


def model_dirs(srv: Server) -> list[Path]:
    """The private working copies of archives the server holds (under its TMPDIR)."""
    return sorted(srv.tmp.glob("marserve-*/marserve-model-*"))


def test_requirements_are_installed_for_the_model(installing: Server, tmp_path: Path) -> None:
    srv = installing
    make_dep_mar(srv.store, tmp_path / "staging", "dep", INSTALLABLE)
    reply = srv.register("dep.mar", initial_workers=1)
    assert reply.status_code == 200, reply.text + srv.log.read_text()
    answer = srv.predict("dep")
    assert answer.status_code == 200, answer.text
    assert answer.text == "from the model's own wheel"
    # Installed for the model alone: into its private copy, never into the server's environment.
    [model_dir] = model_dirs(srv)
    assert list(model_dir.glob(f".python-deps-*/{PACKAGE}/__init__.py"))
    assert importlib.util.find_spec(PACKAGE) is None
    # Unregistering removes the copy and its packages.
    assert srv.http.delete(f"{srv.management}/models/dep").status_code == 200
    assert model_dirs(srv) == []


def test_a_failed_install_fails_the_registration_and_leaves_nothing(installing: Server, tmp_path: Path) -> None:
    srv = installing
    make_dep_mar(srv.store, tmp_path / "staging", "broken", "--no-index\nmarserve-no-such-package==1.0\n")
    reply = srv.register("broken.mar", initial_workers=1)
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert body["type"] == "ModelException"
    # TorchServe's message, then pip's reason.
    prefix = "Custom pip package installation failed for model broken: "
    assert body["message"].startswith(prefix), body
    assert "marserve-no-such-package" in body["message"]
    assert srv.http.get(f"{srv.management}/models").json() == {"models": []}
    assert model_dirs(srv) == []
    assert srv.worker_pids() == []
    # pip's full output is in the server's log.
    assert "pip install failed" in srv.log.read_text()


def test_a_requirements_file_outside_the_archive_is_refused(installing: Server, tmp_path: Path) -> None:
    srv = installing
    mar = make_dep_mar(srv.store, tmp_path / "staging", "escape", INSTALLABLE)
    # Point the manifest outside the archive, as a hostile archive could.
    staged = tmp_path / "rewritten.mar"
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(staged, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                data = data.replace(b'"requirements.txt"', b'"../../../../etc/passwd"')
            target.writestr(item, data)
    staged.replace(mar)
    reply = srv.register("escape.mar", initial_workers=0)
    assert reply.status_code == 400, reply.text
    assert reply.json() == {
        "code": 400,
        "type": "InvalidModelException",
        "message": "requirements file is outside the archive: ../../../../etc/passwd",
    }
    assert model_dirs(srv) == []


def test_requirements_are_not_installed_by_default(server: Server, tmp_path: Path) -> None:
    make_dep_mar(server.store, tmp_path / "staging", "dep", INSTALLABLE)
    reply = server.register("dep.mar", initial_workers=1)
    # The handler's import fails in the worker: nothing installed its package.
    assert reply.status_code == 500, reply.text
    message = reply.json()["message"]
    assert message.startswith("Failed to start workers for model dep version: 1.0"), message
    assert PACKAGE in message
    log = server.log.read_text()
    assert "model dep: its requirements file requirements.txt was not installed" in log
    assert "install_py_dep_per_model=true" in log


def test_a_directory_model_gets_its_packages_outside_the_store(installing: Server, tmp_path: Path) -> None:
    srv = installing
    (tmp_path / "built").mkdir()
    mar = make_dep_mar(tmp_path / "built", tmp_path / "staging", "dirdep", INSTALLABLE)
    directory = srv.store / "dirdep"
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(directory)
    before = sorted(p.relative_to(directory) for p in directory.rglob("*"))
    reply = srv.register("dirdep", initial_workers=1)
    assert reply.status_code == 200, reply.text
    assert srv.predict("dirdep").text == "from the model's own wheel"
    # pip wrote nothing into the model store's directory.
    assert sorted(p.relative_to(directory) for p in directory.rglob("*")) == before
    assert srv.http.delete(f"{srv.management}/models/dirdep").status_code == 200
    assert model_dirs(srv) == []
    assert directory.is_dir()

