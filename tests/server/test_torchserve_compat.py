"""Where marserve once differed from TorchServe 0.12 for no reason: trailing slashes, a startup
timeout of 0, the precise worker state beside TorchServe's, and a server log that says what
happened to every model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import Model, Server, ServerFactory, make_mar, wait_for


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    # Two versions of echo: the second archive replaces the first in the store once it is registered.
    models = [Model("echo", "echo_handler.py"), Model("echo", "echo_handler.py", version="2.0")]
    return start_module_server(models=models, name="compat")


# -- trailing slashes: ignored on every route of every port, with or without a query string ------


@pytest.mark.parametrize(
    ("method", "port", "path", "status"),
    [
        ("GET", "management", "/models/", 200),
        ("GET", "management", "/models/echo/", 200),
        ("GET", "management", "/models/echo/1.0/", 200),
        ("GET", "management", "/models/echo/all/", 200),
        ("OPTIONS", "management", "/models/echo/", 200),
        ("PUT", "management", "/models/echo/1.0/?min_worker=1&synchronous=true", 200),
        ("PUT", "management", "/models/echo/1.0/set-default/", 200),
        ("GET", "management", "/api-description/", 200),
        ("POST", "inference", "/predictions/echo/", 200),
        ("POST", "inference", "/predictions/echo/2.0/", 200),
        ("POST", "inference", "/explanations/echo/?x=1", 200),
        ("GET", "inference", "/ping/", 200),
        ("GET", "inference", "/ping/?probe=k8s", 200),
        ("GET", "inference", "/api-description/", 200),
        ("GET", "metrics", "/metrics/", 200),
        ("GET", "metrics", "/metrics/?name[]=Requests2XX", 200),
    ],
)
def test_a_trailing_slash_changes_nothing(srv: Server, method: str, port: str, path: str, status: int) -> None:
    response = srv.http.request(method, getattr(srv, port) + path, content=b"x" if method == "POST" else None)
    assert response.status_code == status, response.text


def test_delete_with_a_trailing_slash_and_a_query_unregisters(start_server: ServerFactory) -> None:
    server = start_server(models=[Model("squeezenet1_1", "echo_handler.py")])
    response = server.http.delete(f"{server.management}/models/squeezenet1_1/?synchronous=true")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": 'Model "squeezenet1_1" unregistered'}
    assert server.http.get(f"{server.management}/models/squeezenet1_1").status_code == 404


# -- startup_timeout=0 is a limit no worker can meet --------------------------------------------


@pytest.mark.parametrize("where", ["call", "yaml", "default"])
def test_a_startup_timeout_of_zero_fails_the_registration_and_leaves_nothing(
    start_server: ServerFactory, tmp_path: Path, where: str
) -> None:
    server = start_server("default_startup_timeout=0\n" if where == "default" else "")
    params: dict[str, object] = {}
    if where == "yaml":
        config = tmp_path / "model-config.yaml"
        config.write_text("startupTimeout: 0\n")
        make_mar(server.store, "slowstart", "echo_handler.py", config_file=str(config))
    else:
        make_mar(server.store, "slowstart", "echo_handler.py")
        if where == "call":
            params["startup_timeout"] = 0
    response = server.register("slowstart.mar", **params)
    assert response.status_code == 500, response.text
    assert "model load timed out after 0 s" in response.json()["message"]
    assert server.http.get(f"{server.management}/models/slowstart").status_code == 404
    wait_for(lambda: not server.worker_pids(), what="no worker left")


# -- describe: TorchServe's status, and marserve's precise state beside it -------------------------


def test_a_starting_worker_is_unloading_to_torchserve_and_starting_to_marserve(start_server: ServerFactory) -> None:
    server = start_server()
    make_mar(server.store, "slow", "mgmt_slow_load_handler.py")
    assert server.register("slow.mar", synchronous="false").status_code == 202
    worker = server.http.get(f"{server.management}/models/slow").json()[0]["workers"][0]
    assert (worker["status"], worker["state"]) == ("UNLOADING", "STARTING")
    wait_for(
        lambda: server.http.get(f"{server.management}/models/slow").json()[0]["workers"][0]["state"] == "READY",
        what="the worker to load",
    )
    worker = server.http.get(f"{server.management}/models/slow").json()[0]["workers"][0]
    assert worker["status"] == "READY"


# -- the server log says what happened to every model ---------------------------------------------


def test_the_server_log_tells_each_models_story(start_server: ServerFactory) -> None:
    server = start_server()
    make_mar(server.store, "story", "exit_handler.py")
    make_mar(server.store, "broken", "mgmt_import_error_handler.py")
    assert server.register("story.mar", initial_workers=1).status_code == 200
    assert server.register("broken.mar").status_code == 500
    [pid] = server.worker_pids()
    # The handler says why on stderr, then exits with code 3.
    assert server.predict("story", b"exit 3").status_code == 500
    wait_for(lambda: "died" in server.log.read_text(), what="the death in the log")
    wait_for(lambda: server.worker_pids() and server.worker_pids() != [pid], what="the restart")
    assert server.http.put(f"{server.management}/models/story?min_worker=2&synchronous=true").status_code == 200
    assert server.http.put(f"{server.management}/models/story/1.0/set-default").status_code == 200
    assert server.http.delete(f"{server.management}/models/story").status_code == 200
    log = server.log.read_text()
    expected = [
        r"INFO marserve.registry: model story version 1.0 registered from story.mar \(handler exit_handler.py, batch_size 1, max_batch_delay 100 ms, 1 workers\)",
        r"INFO marserve.model: worker \d+ of story:1.0 starting",
        r"INFO marserve.model: worker \d+ of story:1.0 ready \(pid \d+, model loaded in [\d.]+ s\)",
        r"ERROR marserve.model: worker \d+ of broken:1.0 failed to load: .*ModuleNotFoundError",
        r"ERROR marserve.registry: model broken version 1.0 unregistered again: its workers failed to start",
        r"WARNING marserve.model: worker \d+ of story:1.0 died: it exited with code 3; its last output: giving up: asked to exit with code 3; restarting in [\d.]+ s",
        r"INFO marserve.registry: model story version 1.0 scaled: min_worker 2, max_worker 2",
        r"INFO marserve.registry: model story: default version is now 1.0",
        r"INFO marserve.registry: model story version 1.0 unregistered",
    ]
    for pattern in expected:
        assert re.search(pattern, log), pattern
