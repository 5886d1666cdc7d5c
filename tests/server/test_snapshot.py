"""Snapshots: registered models survive ``serve --stop`` / ``serve --start`` (surface §10).

Every test stops a real server and starts another on the same directories (model store, logs,
config), which is what a restart is.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import InProcessServer, Server, make_mar, wait_for

KEYS = (
    "modelName", "modelVersion", "modelUrl", "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay",
    "responseTimeout", "startupTimeout", "loadedAtStartup",
)  # fmt: skip


# -- helpers ---------------------------------------------------------------------------------------


def snapshot_file(srv: Server) -> Path:
    return srv.root / "logs" / "config" / "snapshot.json"


def start(root: Path, config: str = "", args: tuple[str, ...] = (), log_line: str = "restored ") -> Server:
    """A server on ``root``, returned once its start-up models are in (the log line ``log_line``)."""
    log = root / "server.log"
    offset = log.stat().st_size if log.exists() else 0
    srv = InProcessServer(root, config=config, args=args).start()
    wait_for(lambda: log_line in log.read_text()[offset:], what=f"{log_line!r} in the log")
    return srv


def restart(srv: Server, config: str = "", args: tuple[str, ...] = (), log_line: str = "restored ") -> Server:
    srv.stop()
    return start(srv.root, config, args, log_line)


def log_since_start(srv: Server) -> str:
    text = srv.log.read_text()
    return text[text.rfind("marserve listening") :]


def describe(srv: Server, name: str, version: str | None = None) -> dict[str, Any]:
    reply = srv.http.get(f"{srv.management}/models/{name}" + (f"/{version}" if version else ""))
    assert reply.status_code == 200, reply.text
    return reply.json()[0]


def summary(srv: Server, name: str) -> list[dict[str, Any]]:
    reply = srv.http.get(f"{srv.management}/models/{name}/all")
    assert reply.status_code == 200, reply.text
    return [{key: d[key] for key in KEYS} for d in reply.json()]


def ready(srv: Server, name: str, version: str, count: int) -> Callable[[], bool]:
    def check() -> bool:
        workers = describe(srv, name, version)["workers"]
        return len(workers) == count and all(w["status"] == "READY" for w in workers)

    return check


def scale(srv: Server, name: str, version: str, **params: object) -> httpx.Response:
    query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}
    return srv.http.put(f"{srv.management}/models/{name}/{version}", params=query)


def build_version(store: Path, name: str, handler: str, version: str, file_name: str) -> None:
    staging = store.parent / f"staging-{file_name}"
    staging.mkdir(exist_ok=True)
    shutil.move(make_mar(staging, name, handler, version=version), store / file_name)


@pytest.fixture
def first(tmp_path: Path) -> Iterator[Server]:
    """The first server on ``tmp_path``; tests restart it and stop whichever runs last."""
    servers = [start(tmp_path, log_line="no snapshot at ")]
    # The log line comes before the first save: wait for the file too.
    wait_for(lambda: snapshot_file(servers[0]).exists(), what="the first snapshot")
    yield servers[0]
    servers[0].stop()


@pytest.fixture
def running() -> Iterator[list[Server]]:
    """Servers a test starts; each is stopped at the end."""
    servers: list[Server] = []
    yield servers
    for srv in servers:
        srv.stop()


# -- what survives ---------------------------------------------------------------------------------


def test_versions_default_workers_and_batching_survive_a_restart(first: Server, running: list[Server]) -> None:
    store = first.store
    make_mar(store, "ver", "mgmt_version_handler.py", version="1.0")
    build_version(store, "ver", "mgmt_version_handler.py", "2.0", "ver_v2.mar")
    make_mar(store, "echo", "echo_handler.py")
    assert first.register("ver.mar", initial_workers=1).status_code == 200
    reply = first.register("ver_v2.mar", batch_size=4, max_batch_delay=20, response_timeout=30, startup_timeout=40)
    assert reply.status_code == 200, reply.text
    assert scale(first, "ver", "2.0", min_worker=2, max_worker=3, synchronous=True).status_code == 200
    assert first.http.put(f"{first.management}/models/ver/2.0/set-default").status_code == 200
    assert first.register("echo.mar", initial_workers=0).status_code == 200
    before = {name: summary(first, name) for name in ("ver", "echo")}

    second = restart(first)
    running.append(second)
    assert {name: summary(second, name) for name in ("ver", "echo")} == before
    assert describe(second, "ver")["modelVersion"] == "2.0"
    wait_for(ready(second, "ver", "2.0", 2), what="two workers of ver 2.0")
    wait_for(ready(second, "ver", "1.0", 1), what="one worker of ver 1.0")
    assert describe(second, "echo")["workers"] == []
    assert second.predict("ver").content == b"2.0"
    assert second.http.post(f"{second.inference}/predictions/ver/1.0", content=b"x").content == b"1.0"
    log = log_since_start(second)
    restored = f"restored ver 1.0, ver 2.0, echo 1.0 from {snapshot_file(second)} (3 of 3 saved)"
    assert f"{restored}; start with --ncs to skip" in log

    # One private file, replaced whole: no temporary file is left beside it.
    path = snapshot_file(second)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["snapshot.json"]
    saved = json.loads(path.read_text())
    assert saved["format"] == 1
    [v1, v2, echo] = saved["models"]
    # Only what the API set explicitly is kept: config and YAML still decide the rest.
    assert v1 == {
        "name": "ver", "version": "1.0", "url": "ver.mar", "default": False, "loaded_at_startup": False,
        "params": {}, "workers": {"min": 1, "max": 1},
    }  # fmt: skip
    assert v2["default"] is True and v2["workers"] == {"min": 2, "max": 3}
    assert v2["params"] == {"batch_size": 4, "max_batch_delay": 20, "response_timeout": 30, "startup_timeout": 40}
    assert echo["workers"] == {"min": 0, "max": 0}


def test_each_change_is_saved_before_the_api_answers(first: Server) -> None:
    make_mar(first.store, "echo", "echo_handler.py")

    def saved() -> dict[str, Any]:
        return {(m["name"], m["version"]): m for m in json.loads(snapshot_file(first).read_text())["models"]}

    assert first.register("echo.mar", initial_workers=0).status_code == 200
    assert list(saved()) == [("echo", "1.0")]
    assert scale(first, "echo", "1.0", min_worker=1, max_worker=2).status_code == 202
    assert saved()[("echo", "1.0")]["workers"] == {"min": 1, "max": 2}
    for i in range(6):
        assert first.register("echo.mar", model_name=f"e{i}", initial_workers=0).status_code == 200
    assert len(saved()) == 7
    assert first.http.delete(f"{first.management}/models/e3").status_code == 200
    assert ("e3", "1.0") not in saved()
    assert sorted(p.name for p in snapshot_file(first).parent.iterdir()) == ["snapshot.json"]


def test_unregister_is_remembered(first: Server, running: list[Server]) -> None:
    make_mar(first.store, "ver", "mgmt_version_handler.py", version="1.0")
    build_version(first.store, "ver", "mgmt_version_handler.py", "2.0", "ver_v2.mar")
    make_mar(first.store, "echo", "echo_handler.py")
    for url in ("ver.mar", "ver_v2.mar", "echo.mar"):
        assert first.register(url, initial_workers=0).status_code == 200
    assert first.http.delete(f"{first.management}/models/ver/2.0").status_code == 200
    assert first.http.delete(f"{first.management}/models/echo").status_code == 200

    second = restart(first)
    running.append(second)
    assert [d["modelVersion"] for d in summary(second, "ver")] == ["1.0"]
    assert second.http.get(f"{second.management}/models/echo").status_code == 404


def test_a_config_change_applies_where_the_api_set_nothing(first: Server, running: list[Server]) -> None:
    make_mar(first.store, "echo", "echo_handler.py")
    assert first.register("echo.mar", batch_size=4).status_code == 200
    assert describe(first, "echo")["maxBatchDelay"] == 100 and describe(first, "echo")["minWorkers"] == 1

    models = json.dumps({"echo": {"1.0": {"batchSize": 8, "maxBatchDelay": 7}}})
    second = restart(first, config=f"models={models}\ndefault_workers_per_model=2\n")
    running.append(second)
    settings = describe(second, "echo")
    # batch_size was the API's: it stays. The delay and the worker count were never set through
    # the API, so today's config.properties decides them.
    assert (settings["batchSize"], settings["maxBatchDelay"], settings["minWorkers"]) == (4, 7, 2)
    wait_for(ready(second, "echo", "1.0", 2), what="two workers of echo")


# -- --ncs, --models and model_snapshot ------------------------------------------------------------


def test_ncs_neither_restores_nor_saves(first: Server, running: list[Server]) -> None:
    make_mar(first.store, "echo", "echo_handler.py")
    assert first.register("echo.mar", initial_workers=0).status_code == 200
    first.stop()
    saved = snapshot_file(first).read_bytes()

    second = start(first.root, args=("--ncs",), log_line="snapshots are off (--ncs)")
    running.append(second)
    assert second.http.get(f"{second.management}/models/echo").status_code == 404
    assert second.register("echo.mar", model_name="other", initial_workers=0).status_code == 200
    second.stop()
    assert snapshot_file(first).read_bytes() == saved

    third = start(first.root)
    running.append(third)
    assert third.http.get(f"{third.management}/models/other").status_code == 404
    assert describe(third, "echo")["modelUrl"] == "echo.mar"


def test_ncs_from_the_first_start_writes_nothing(tmp_path: Path, running: list[Server]) -> None:
    srv = start(tmp_path, args=("--ncs",), log_line="snapshots are off (--ncs)")
    running.append(srv)
    make_mar(srv.store, "echo", "echo_handler.py")
    assert srv.register("echo.mar", initial_workers=0).status_code == 200
    srv.stop()
    assert not (tmp_path / "logs" / "config").exists()


def test_models_flag_with_a_snapshot(first: Server, running: list[Server]) -> None:
    make_mar(first.store, "echo", "echo_handler.py")
    make_mar(first.store, "other", "echo_handler.py")
    second = restart(first, args=("--models", "echo=echo.mar"), log_line="startup model echo=echo.mar: ")
    running.append(second)
    assert scale(second, "echo", "1.0", min_worker=2, synchronous=True).status_code == 200

    # echo comes back as the snapshot has it (2 workers); other.mar is new, so --models loads it.
    third = restart(second, args=("--models", "echo=echo.mar", "other.mar"), log_line="startup model other.mar: ")
    running.append(third)
    assert summary(third, "echo")[0]["minWorkers"] == 2
    assert summary(third, "echo")[0]["loadedAtStartup"] is True
    assert summary(third, "other")[0]["loadedAtStartup"] is True
    log = log_since_start(third)
    assert f"startup model echo=echo.mar skipped because {snapshot_file(third)} has it" in log
    wait_for(ready(third, "echo", "1.0", 2), what="two workers of echo")
    assert third.predict("other", b"hi").content == b"hi"


def test_model_snapshot_in_config_is_restored_instead_of_the_file(first: Server, running: list[Server]) -> None:
    make_mar(first.store, "echo", "echo_handler.py")
    make_mar(first.store, "mnist", "echo_handler.py")
    assert first.register("echo.mar", initial_workers=0).status_code == 200
    # TorchServe's format, as KServe images write it.
    snapshot = {
        "name": "startup.cfg", "modelCount": 1,
        "models": {"mnist": {"1.0": {
            "defaultVersion": True, "marName": "mnist.mar", "minWorkers": 1, "maxWorkers": 3,
            "batchSize": 2, "maxBatchDelay": 10, "responseTimeout": 60, "runtimeType": "python",
        }}},
    }  # fmt: skip
    second = restart(first, config=f"model_snapshot={json.dumps(snapshot)}\n")
    running.append(second)
    assert second.http.get(f"{second.management}/models/echo").status_code == 404
    [mnist] = summary(second, "mnist")
    assert (mnist["minWorkers"], mnist["maxWorkers"], mnist["batchSize"], mnist["maxBatchDelay"]) == (1, 3, 2, 10)
    assert mnist["responseTimeout"] == 60
    log = log_since_start(second)
    assert f"restoring model_snapshot from config.properties, not {snapshot_file(second)}" in log
    assert "from model_snapshot in config.properties (1 of 1 saved)" in log


# -- failures --------------------------------------------------------------------------------------


def test_a_model_that_cannot_come_back_is_logged_and_the_rest_restored(first: Server, running: list[Server]) -> None:
    make_mar(first.store, "gone", "echo_handler.py")
    make_mar(first.store, "echo", "echo_handler.py")
    assert first.register("gone.mar", initial_workers=0, batch_size=3).status_code == 200
    assert first.register("echo.mar", initial_workers=0).status_code == 200
    first.stop()
    (first.store / "gone.mar").unlink()

    second = start(first.root)
    running.append(second)
    assert second.http.get(f"{second.management}/models/gone").status_code == 404
    assert summary(second, "echo")[0]["modelUrl"] == "echo.mar"
    log = log_since_start(second)
    assert f"ERROR marserve.snapshot: could not restore model gone 1.0 from {snapshot_file(second)}" in log
    # What was lost is in the log, whole, for whoever wants it back.
    assert '"url": "gone.mar"' in log and '"batch_size": 3' in log
    assert "restored echo 1.0" in log and "(1 of 2 saved)" in log
    # Written once the restore has ended, a moment after its log lines.
    wait_for(
        lambda: [m["name"] for m in json.loads(snapshot_file(second).read_text())["models"]] == ["echo"],
        what="the snapshot saved without the lost model",
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "is not valid JSON"),
        ('{"format": 2, "models": []}', "has format 2, this marserve reads format 1"),
        ("[]", "is not a marserve snapshot"),
        ('{"format": 1, "models": [{"name": "a", "version": "1", "url": "a.mar", "params": {"batch_size": "4"}}]}',
         "is invalid: models.0: Value error, params.batch_size: Input should be a valid integer"),
        ('{"format": 1, "models": [{"name": "a", "version": "1", "url": "a.mar", "params": {"bogus": 1}}]}',
         "unknown register parameter 'bogus'"),
    ],
)  # fmt: skip
def test_a_corrupt_snapshot_stops_the_start(tmp_path: Path, content: str, problem: str) -> None:
    srv = Server(tmp_path)
    path = tmp_path / "logs" / "config" / "snapshot.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    for mode in (("--foreground",), ()):
        result = subprocess.run(
            srv.command("--start", *mode), env=srv.env, cwd=srv.root, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("serve: error: ")
        assert str(path) in result.stderr and problem in result.stderr
        assert "fix or remove the file, or start with --ncs to ignore it" in result.stderr
    assert path.read_text() == content  # nothing overwrote it


def test_a_corrupt_snapshot_is_ignored_with_ncs(tmp_path: Path, running: list[Server]) -> None:
    path = tmp_path / "logs" / "config" / "snapshot.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    running.append(start(tmp_path, args=("--ncs",), log_line="snapshots are off (--ncs)"))
    assert path.read_text() == "{not json"


def test_a_saved_model_over_todays_worker_cap_is_left_out_whole(first: Server, running: list[Server]) -> None:
    make_mar(first.store, "mnist", "echo_handler.py")
    snapshot = {"models": {"mnist": {"1.0": {"marName": "mnist.mar", "minWorkers": 0, "maxWorkers": 50}}}}
    second = restart(first, config=f"max_workers=4\nmodel_snapshot={json.dumps(snapshot)}\n")
    running.append(second)
    # Not registered with its minimum and then refused its maximum: not registered at all.
    assert second.http.get(f"{second.management}/models/mnist").status_code == 404
    log = log_since_start(second)
    assert "could not restore model mnist 1.0 from model_snapshot in config.properties" in log
    assert "Invalid value for max_worker: 50" in log


def test_a_bad_model_snapshot_stops_the_start(tmp_path: Path) -> None:
    srv = Server(tmp_path, config='model_snapshot={"models": {"m": {"1.0": {"minWorkers": 1}}}}\n')
    result = subprocess.run(
        srv.command("--start", "--foreground"), env=srv.env, cwd=srv.root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr == (
        "serve: error: invalid model_snapshot in config.properties: model m version 1.0: marName: Field required\n"
    )


def test_a_failed_write_is_logged_and_the_call_succeeds(first: Server) -> None:
    make_mar(first.store, "echo", "echo_handler.py")
    path = snapshot_file(first)
    path.unlink()
    path.mkdir()  # the file cannot be replaced by a directory: every write now fails
    try:
        reply = first.register("echo.mar", initial_workers=0)
        assert reply.status_code == 200, reply.text
        assert f"ERROR marserve.snapshot: could not save the snapshot {path}" in first.log.read_text()
        assert sorted(p.name for p in path.parent.iterdir()) == ["snapshot.json"]  # no temporary file left
    finally:
        first.stop()
        path.rmdir()
