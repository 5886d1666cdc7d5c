"""A storm of worker starts, against real ``serve`` processes: the frontend keeps answering while
many workers start, and a SIGTERM in the middle of the storm stops the server within its bound.

The server's caps are raised for these tests (the defaults on a small machine are a few workers).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.serve import GRACEFUL_SHUTDOWN_SECONDS
from tests.conftest import SERVER_MARKER, Server, ServerFactory, alive, make_mar, wait_for


def marked_workers(srv: Server) -> list[int]:
    """Worker processes carrying this server's marker, whoever their parent is now (a worker left
    behind by a stopped frontend is re-parented)."""
    marker = f"{SERVER_MARKER}={srv.id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"server.workers.child" not in (entry / "cmdline").read_bytes():
                continue
            if marker in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def ready_workers(srv: Server, name: str) -> int:
    reply = srv.http.get(f"{srv.management}/models/{name}")
    return sum(1 for worker in reply.json()[0]["workers"] if worker["status"] == "READY")


class Pinger(threading.Thread):
    """Pings the inference port back to back from its own connection, keeping every latency."""

    def __init__(self, srv: Server) -> None:
        super().__init__(daemon=True)
        self.url = f"{srv.inference}/ping"
        self.latencies: list[float] = []
        self.failures = 0
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.done.is_set():
                began = time.perf_counter()
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - began)
                self.failures += not ok
                time.sleep(0.005)

    def stop(self) -> list[float]:
        self.done.set()
        self.join(60)
        return sorted(self.latencies)


def test_ping_keeps_answering_while_50_workers_start(start_server: ServerFactory) -> None:
    srv = start_server("max_workers=50\nmax_workers_per_model=50\n", subprocess=True)
    make_mar(srv.store, "echo", "echo_handler.py")
    pinger = Pinger(srv)
    pinger.start()
    time.sleep(0.5)
    began = time.monotonic()
    reply = srv.register("echo.mar", initial_workers=50, synchronous=False)
    assert reply.status_code == 202, reply.text
    wait_for(lambda: ready_workers(srv, "echo") == 50, 180, "the 50 workers to start")
    took = time.monotonic() - began
    latencies = pinger.stop()
    p99 = latencies[int(len(latencies) * 0.99)]
    print(
        f"/ping while 50 workers started ({took:.1f} s): {len(latencies)} pings, "
        f"p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
    assert pinger.failures == 0
    assert p99 < 0.5, f"p99 {p99:.3f} s"
    assert srv.predict("echo", b"hi").content == b"hi"


@pytest.mark.parametrize("handler", ["echo_handler.py", "mgmt_slow_load_handler.py"])
def test_sigterm_during_a_storm_of_starts_stops_the_server_at_once(start_server: ServerFactory, handler: str) -> None:
    srv = start_server("max_workers=300\nmax_workers_per_model=300\n", subprocess=True)
    make_mar(srv.store, "storm", handler)  # quick to load, or 2 s each
    reply = srv.register("storm.mar", initial_workers=300, synchronous=False)
    assert reply.status_code == 202, reply.text
    wait_for(lambda: len(marked_workers(srv)) >= 2, 30, "workers to start")
    assert srv.process is not None
    began = time.monotonic()
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(timeout=60) == 0
    took = time.monotonic() - began
    print(f"stopped {took:.2f} s after SIGTERM")
    assert took < 5, f"the server took {took:.1f} s to stop"
    wait_for(lambda: not marked_workers(srv), 5, "every worker to be gone")


def test_sigterm_with_a_synchronous_register_in_flight_stops_within_the_graceful_bound(
    start_server: ServerFactory,
) -> None:
    # The register call is a request in flight: the listeners give it up to the graceful bound,
    # then the registry cancels the starts it waits for.
    srv = start_server("max_workers=100\nmax_workers_per_model=100\n", subprocess=True)
    make_mar(srv.store, "slow", "mgmt_slow_load_handler.py")
    answers: list[int] = []

    def register() -> None:
        try:
            answers.append(srv.register("slow.mar", initial_workers=100).status_code)
        except httpx.HTTPError:
            answers.append(0)  # the connection was closed unanswered

    caller = threading.Thread(target=register)
    caller.start()
    wait_for(lambda: len(marked_workers(srv)) >= 2, 30, "workers to start")
    assert srv.process is not None
    began = time.monotonic()
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(timeout=GRACEFUL_SHUTDOWN_SECONDS + 30) == 0
    took = time.monotonic() - began
    print(f"stopped {took:.2f} s after SIGTERM, with a synchronous register in flight")
    assert took < GRACEFUL_SHUTDOWN_SECONDS + 10, f"the server took {took:.1f} s to stop"
    caller.join(30)
    assert answers and answers[0] != 200
    wait_for(lambda: not marked_workers(srv), 5, "every worker to be gone")
