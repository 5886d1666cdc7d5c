"""Workers forked from a warm template, and workers that import only what their handler needs.

The template (server/workers/templates.py, child/template.py) has imported torch and the worker's
code once; workers are its children. These tests look at the processes themselves: who forked a
worker, what it imported, what environment and thread count it ended up with, and what happens
when the template dies or is turned off.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from server.workers.templates import WorkerTemplates
from tests.conftest import Server, ServerFactory, make_mar, wait_for


def install(server: Server, name: str = "env", **params: object) -> None:
    make_mar(server.store, name, "env_handler.py")
    response = server.register(f"{name}.mar", **params)
    assert response.status_code == 200, response.text


def report(server: Server, name: str = "env") -> dict[str, Any]:
    response = server.predict(name, b"x")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = json.loads(response.content)
    return answer


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def worker_pids(server: Server, name: str = "env") -> list[int]:
    described = server.http.get(f"{server.management}/models/{name}").json()[0]["workers"]
    return [w["pid"] for w in described if w["state"] == "READY"]


@pytest.fixture
def templated(start_server: ServerFactory, tmp_path: Path) -> Server:
    return start_server(root=tmp_path, env={"ENV_HANDLER_MARKER": "from-the-server"})


def test_workers_are_forked_from_the_template_with_their_own_environment(templated: Server) -> None:
    install(templated, initial_workers=2)
    pids = worker_pids(templated)
    assert len(pids) == 2
    [template] = {parent_of(pid) for pid in pids}
    assert "server.workers.child.template" in command_line(template)
    answer = report(templated)
    assert answer["pid"] in pids and answer["ppid"] == template
    # Its directory, its share of the cores and the server's environment are the worker's own.
    assert (Path(answer["cwd"]) / "env_handler.py").is_file()  # the model's extracted archive
    assert answer["omp"] is not None and answer["threads"] == int(answer["omp"])
    assert answer["marker"] == "from-the-server"


def test_a_worker_imports_no_torchvision_unless_its_handler_does(templated: Server) -> None:
    install(templated)
    assert report(templated)["loaded"] == []


def test_a_dead_template_is_replaced_and_its_workers_restart(templated: Server) -> None:
    install(templated, initial_workers=1)
    [pid] = worker_pids(templated)
    template = parent_of(pid)
    os.kill(template, signal.SIGKILL)
    # Its worker dies with it (PR_SET_PDEATHSIG), and comes back from a new template.
    wait_for(lambda: (p := worker_pids(templated)) and p[0] != pid, 60, "the worker to be replaced")
    [new_pid] = worker_pids(templated)
    new_template = parent_of(new_pid)
    assert new_template != template
    assert "server.workers.child.template" in command_line(new_template)
    assert report(templated)["pid"] == new_pid


def test_with_the_template_off_workers_are_spawned(start_server: ServerFactory, tmp_path: Path) -> None:
    server = start_server("worker_template=false\n", root=tmp_path)
    install(server)
    [pid] = worker_pids(server)
    assert parent_of(pid) == os.getpid()  # the in-process server's frontend: this process
    assert "server.workers.child --fd" in command_line(pid)
    assert report(server)["loaded"] == []


@pytest.mark.parametrize("template", ["true", "false"])
def test_a_worker_s_output_reaches_the_server_log_over_a_socket(
    start_server: ServerFactory, tmp_path: Path, template: str
) -> None:
    # Not a pipe: uvloop's connect_read_pipe closes a pipe's descriptor twice (MagicStack/uvloop#763),
    # and a thread of the server given the same number in between lost it (CI saw a worker's start
    # fail with EBADF while other workers stopped). A socket, uvloop detaches instead.
    server = start_server(f"worker_template={template}\n", root=tmp_path)
    install(server)
    [pid] = worker_pids(server)
    assert os.readlink(f"/proc/{pid}/fd/1").startswith("socket:")
    assert os.readlink(f"/proc/{pid}/fd/2").startswith("socket:")
    wait_for(lambda: f"env reporter loaded in pid {pid}" in server.log.read_text(), 10, "the worker's line in the log")


def test_only_the_server_s_environment_is_forked() -> None:
    templates = WorkerTemplates({"PATH": "/bin", "PYTHONPATH": "/srv/lib"})
    base = {"PATH": "/bin", "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    # The model's directory first on PYTHONPATH, and the thread counts, are the worker's own.
    assert templates.eligible({**base, "OMP_NUM_THREADS": "3", "PYTHONPATH": "/m:/srv/lib"}, "/m")
    # Packages of its own (install_py_dep_per_model), or another environment: spawned.
    assert not templates.eligible({**base, "PYTHONPATH": "/m:/m/packages:/srv/lib"}, "/m")
    assert not templates.eligible({**base, "PYTHONPATH": "/m:/srv/lib", "EXTRA": "1"}, "/m")


def test_a_template_that_cannot_start_leaves_workers_spawned(
    start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A sitecustomize on the server's PYTHONPATH that stops the template (and nothing else).
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nif 'server.workers.child.template' in sys.orig_argv:\n    sys.exit(3)\n"
    )
    server = start_server(root=tmp_path / "srv", env={"PYTHONPATH": str(site)})
    install(server, initial_workers=2)
    pids = worker_pids(server)
    assert len(pids) == 2 and {parent_of(pid) for pid in pids} == {os.getpid()}
    assert report(server)["pid"] in pids
    warnings = [r.getMessage() for r in caplog.records if "workers will be spawned, not forked" in r.getMessage()]
    assert len(warnings) == 1, warnings
