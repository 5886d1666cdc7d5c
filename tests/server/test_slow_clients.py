"""The server under clients that drip, crowd or send garbage, and logs that would grow for ever:
real servers, real sockets."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import Model, Server, ServerFactory

DRIP_CONNECTIONS = 3000


def test_thousands_of_drip_connections_do_not_lock_out_other_clients(start_server: ServerFactory) -> None:
    # 1024 files: without a connection cap, a few thousand connections use them all and accept()
    # fails for everyone (EMFILE); with it, each new connection closes the oldest headless one.
    server = start_server(subprocess=True, start=False)
    server.launcher = ["prlimit", "--nofile=1024:1024", "--"]
    server.start()
    Model("echo", "echo_handler.py").install(server)
    drips: list[socket.socket] = []
    try:
        for i in range(DRIP_CONNECTIONS):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.ports[0]))
            drips.append(sock)
            if i % 500 == 499:
                # Well-behaved clients are served all along.
                assert httpx.get(f"{server.inference}/ping", timeout=10).status_code == 200
                assert server.predict("echo", b"fine").content == b"fine"
        started = time.monotonic()
        while time.monotonic() - started < 3:
            for sock in drips:
                try:
                    sock.send(b"G")  # one byte at a time, never a whole head
                except OSError:
                    pass
            for _ in range(3):
                assert httpx.get(f"{server.inference}/ping", timeout=10).status_code == 200
                assert server.predict("echo", b"still").content == b"still"
            time.sleep(0.5)
        metrics = httpx.get(f"{server.metrics}/metrics", params={"name[]": "marserve_http_refused"}).text
        evicted = re.search(r'marserve_http_refused_total\{reason="evicted"\} (\d+)', metrics)
        assert evicted and int(evicted[1]) >= DRIP_CONNECTIONS - 1024
    finally:
        for sock in drips:
            sock.close()


def test_refused_messages_are_counted_and_logged_once_a_minute(start_server: ServerFactory) -> None:
    server = start_server()
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", server.ports[0]), timeout=10) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    metrics = server.http.get(f"{server.metrics}/metrics", params={"name[]": "marserve_http_refused"}).text
    assert 'marserve_http_refused_total{reason="invalid"} 50.0' in metrics
    # One line for the first; the other 49 wait for the minute's summary.
    lines = [line for line in server.log.read_text().splitlines() if "refused connections or messages" in line]
    assert lines == [lines[0]] and lines[0].endswith("invalid 1")


def test_logs_are_rotated_at_log_max_bytes(tmp_path: Path) -> None:
    server = Server(tmp_path, config="log_max_bytes=4096\nlog_backup_count=2\n")
    logs = tmp_path / "logs"
    started = subprocess.run(server.command("--start"), env=server.env, cwd=tmp_path, capture_output=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        with httpx.Client() as client:
            for _ in range(400):
                assert client.get(f"{server.inference}/ping").status_code == 200
    finally:
        # Stopped before looking: the last lines are written, and nothing rotates meanwhile.
        subprocess.run(server.command("--stop"), env=server.env, cwd=tmp_path, capture_output=True, timeout=120)
    names = ("access_log.log.2", "access_log.log.1", "access_log.log")
    for name in names:
        assert 0 < (logs / name).stat().st_size <= 4096
    assert not (logs / "access_log.log.3").exists()
    # Nothing was lost but what the oldest files took with them: the newest lines are all there.
    lines = "".join((logs / name).read_text() for name in names).splitlines()
    assert all('"GET /ping" 200' in line for line in lines) and 60 < len(lines) < 400
