"""The serve command: start in the background or foreground, stop, version, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from importlib.metadata import version

import httpx
import pytest

from tests.conftest import BIN, Server, make_mar


@pytest.fixture
def server(subprocess_server: Server) -> Server:
    """The serve command's own process: these tests stop it, signal it and kill it."""
    return subprocess_server


def run(server: Server, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        server.command(*args), env=server.env, cwd=server.root, capture_output=True, text=True, timeout=timeout
    )


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_version() -> None:
    result = subprocess.run([str(BIN / "serve"), "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    # marserve's own version, and the TorchServe release whose APIs it follows.
    assert result.stdout == f"marserve Version is {version('marserve')} (TorchServe 0.12.0 compatible)\n"


def test_background_start_second_start_and_stop(tmp_path: Path) -> None:
    server = Server(tmp_path)
    make_mar(server.store, "echo", "echo_handler.py")
    started = run(server, "--start", "--models", "echo=echo.mar")
    try:
        assert started.returncode == 0, started.stderr
        # It returns only once every port listens, and says where.
        for url in (server.inference, server.management, server.metrics):
            assert url in started.stdout
        assert httpx.get(f"{server.inference}/ping").json() == {"status": "Healthy"}
        assert httpx.get(f"{server.metrics}/metrics").status_code == 200
        again = run(server, "--start")
        assert again.returncode == 1
        assert again.stderr.strip() == "serve: error: marserve is already running, please use serve --stop to stop it."
        # --models loads in the background: wait for the worker, then predict.
        deadline = time.monotonic() + 60
        while server.predict("echo", b"hi").status_code != 200:
            assert time.monotonic() < deadline, (server.root / "logs" / "marserve.log").read_text()
            time.sleep(0.1)
        pid = int((server.tmp / ".marserve.pid").read_text())
        assert f"marserve started (pid {pid})" in started.stdout
        # Detached in a session of its own: a hang-up or Ctrl-C on the caller's terminal never reaches it.
        assert os.getsid(pid) == pid
        workers = [p for p in _children(pid) if b"server.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert workers
        # A stale pid file elsewhere that names this server's pid (written before it started, as by a
        # server that died and whose pid was given again) stops nothing.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        stale = elsewhere / ".marserve.pid"
        stale.write_text(str(pid))
        os.utime(stale, (time.time() - 3600, time.time() - 3600))
        other = subprocess.run(
            [str(BIN / "serve"), "--stop"], env={**server.env, "TMPDIR": str(elsewhere)}, capture_output=True, text=True
        )
        assert other.stdout.strip() == "marserve is not currently running."
        assert not stale.exists() and server.predict("echo", b"still").status_code == 200
    finally:
        stopped = run(server, "--stop")
    assert stopped.returncode == 0
    assert stopped.stdout.strip() == "marserve has stopped."
    assert wait_gone([pid, *workers], 10)
    assert not (server.tmp / ".marserve.pid").exists()
    assert run(server, "--stop").stdout.strip() == "marserve is not currently running."


def test_stop_lets_in_flight_requests_finish(server: Server) -> None:
    make_mar(server.store, "slow", "cli_slow_handler.py")
    assert server.register("slow.mar").status_code == 200
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(server.predict("slow"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # let the requests reach the server before the stop
    workers = server.worker_pids()
    assert run(server, "--stop").returncode == 0
    for thread in threads:
        thread.join(timeout=30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.content == b"done" for r in results)
    assert server.process is not None and server.process.wait(timeout=10) == 0
    assert wait_gone(workers, 10)


def test_workers_exit_when_the_frontend_is_killed(server: Server) -> None:
    make_mar(server.store, "echo", "echo_handler.py")
    assert server.register("echo.mar", initial_workers=2).status_code == 200
    workers = server.worker_pids()
    assert len(workers) == 2
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    assert wait_gone(workers, 5), "worker processes outlived a SIGKILLed frontend"


def test_missing_and_bad_model_store(tmp_path: Path) -> None:
    no_store = subprocess.run([str(BIN / "serve"), "--start"], cwd=tmp_path, capture_output=True, text=True)
    assert no_store.returncode == 1
    assert no_store.stderr.strip() == "serve: error: Missing mandatory parameter --model-store"
    missing = subprocess.run(
        [str(BIN / "serve"), "--start", "--model-store", "nope"], cwd=tmp_path, capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == "serve: error: --model-store directory not found: nope"


def test_bad_config_value_is_one_line_naming_the_key(tmp_path: Path) -> None:
    server = Server(tmp_path, config="job_queue_size=lots\n")
    result = run(server, "--start", "--foreground", timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "job_queue_size" in result.stderr


def test_port_in_use_fails_the_start(tmp_path: Path) -> None:
    import socket

    server = Server(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", server.ports[1]))
        busy.listen()
        result = run(server, "--start", timeout=60)
    reason = f"cannot listen on 127.0.0.1:{server.ports[1]} (management_address): address already in use"
    # The reason on the terminal, in one line, as well as in the log.
    assert result.returncode == 1
    assert result.stderr.strip() == f"serve: error: {reason}"
    assert reason in (server.root / "logs" / "ts_log.log").read_text()
    assert "Traceback" not in (server.root / "logs" / "marserve.log").read_text()
    assert "Uvicorn" not in (server.root / "logs" / "ts_log.log").read_text()


def test_port_in_use_fails_a_foreground_start_with_the_reason(tmp_path: Path) -> None:
    import socket

    server = Server(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", server.ports[0]))
        busy.listen()
        result = run(server, "--start", "--foreground", timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"serve: error: cannot listen on 127.0.0.1:{server.ports[0]} (inference_address): address already in use"
    )
    assert "Traceback" not in result.stderr


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, ValueError):
                pass
    return children


def test_models_all_registers_every_archive_in_the_store(tmp_path: Path) -> None:
    server = Server(tmp_path, args=("--models", "all"))
    make_mar(server.store, "first", "echo_handler.py")
    make_mar(server.store, "second", "echo_handler.py")
    server.start()
    try:
        deadline = time.monotonic() + 60
        for model in ("first", "second"):
            while server.predict(model, b"hi").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        described = server.http.get(f"{server.management}/models/first").json()[0]
        assert described["loadedAtStartup"] is True
    finally:
        server.stop()
