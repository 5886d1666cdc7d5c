"""Handler errors, broken outputs, crashed and hung workers: what clients get, and how workers recover."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Model, Server, ServerFactory, alive, make_mar, wait_for


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    return start_module_server(models=[Model("fail", "inf_fail_handler.py")], name="failures")


def calls(server: Server) -> list[tuple[int, str]]:
    """(pid, body) of every request a handler has run, oldest first."""
    log = server.tmp / "inf_calls.log"
    if not log.exists():
        return []
    return [(int(pid), body) for pid, _, body in (line.partition(" ") for line in log.read_text().splitlines())]


# Shared: httpx's top-level functions build a TLS context per call (~50 ms).
_client = httpx.Client(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    _client.close()


def post(server: Server, model: str, body: bytes, client: httpx.Client | None = None) -> httpx.Response:
    return (client or _client).post(f"{server.inference}/predictions/{model}", content=body)


def ok_pid(server: Server, model: str) -> int:
    response = post(server, model, b"ok")
    assert response.status_code == 200, response.text
    return int(response.json()["pid"])


def register(server: Server, name: str, **params: object) -> None:
    make_mar(server.store, name, "inf_fail_handler.py")
    response = server.register(f"{name}.mar", **params)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("command", "status", "message"),
    [
        ("raise", 503, "Prediction failed"),
        ("teapot", 418, "I am a teapot"),
        ("count", 503, "number of batch response mismatched"),
        ("notlist", 503, "Invalid model predict output"),
        ("unserializable", 503, "Unsupported model output data type."),
        ("oom", 507, "Out of resources"),
        ("cuda", 507, "Out of resources"),
    ],
)
def test_handler_failure_maps_to_status_and_worker_survives(
    srv: Server, command: str, status: int, message: str
) -> None:
    pid = ok_pid(srv, "fail")
    response = post(srv, "fail", command.encode())
    assert response.status_code == status
    assert response.json() == {"code": status, "type": "InternalServerException", "message": message}
    assert response.headers["x-request-id"]
    # Unlike TorchServe, errors keep the connection: a client retrying pays no new handshake.
    assert response.headers.get("connection") != "close"
    # The same process keeps serving: a handler error is not a worker failure.
    assert ok_pid(srv, "fail") == pid


def test_worker_killed_mid_batch_fails_request_and_restarts(srv: Server) -> None:
    register(srv, "killed")
    old_pid = ok_pid(srv, "killed")
    result: dict[str, object] = {}

    def slow_request() -> None:
        with httpx.Client(timeout=30) as own:  # this thread's own connection
            result["response"] = post(srv, "killed", b"sleep:30", own)
        result["at"] = time.monotonic()

    client = threading.Thread(target=slow_request)
    client.start()
    wait_for(lambda: (old_pid, "sleep:30") in calls(srv), 10, "the handler to start the slow request")
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    client.join(10)
    response = result["response"]
    assert isinstance(response, httpx.Response)
    # SIGKILL from outside (the OOM killer's signal) is 507, as TorchServe does for exit code 137.
    assert response.status_code == 507
    assert response.json() == {"code": 507, "type": "InternalServerException", "message": "Worker died."}
    assert result["at"] - killed_at < 1.5  # type: ignore[operator]
    # Requests sent while the worker restarts wait for the new one.
    new_pid = ok_pid(srv, "killed")
    assert new_pid != old_pid
    assert new_pid in srv.worker_pids()


def test_response_timeout_kills_and_replaces_worker(srv: Server) -> None:
    register(srv, "hung", response_timeout=1)
    old_pid = ok_pid(srv, "hung")
    started = time.monotonic()
    response = post(srv, "hung", b"sleep:5")
    elapsed = time.monotonic() - started
    assert response.status_code == 500
    assert response.json() == {"code": 500, "type": "InternalServerException", "message": "Worker died."}
    # Well before the handler's own 5 s: the timeout, not the handler, ended the request.
    assert 0.9 < elapsed < 4.5
    wait_for(lambda: not alive(old_pid), 5, "the hung worker to be killed")
    new_pid = ok_pid(srv, "hung")
    assert new_pid != old_pid


def test_worker_exit_in_handler_is_worker_died(srv: Server) -> None:
    register(srv, "exits")
    old_pid = ok_pid(srv, "exits")
    response = post(srv, "exits", b"exit")
    assert response.status_code == 500
    assert response.json()["message"] == "Worker died."
    assert ok_pid(srv, "exits") != old_pid


def test_handler_error_fails_the_whole_batch(srv: Server) -> None:
    register(srv, "batched", batch_size=4, max_batch_delay=300)

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{srv.inference}/predictions/batched"
            return await asyncio.gather(*(client.post(url, content=body) for body in (b"ok", b"ok", b"teapot", b"ok")))

    responses = asyncio.run(send())
    assert [r.status_code for r in responses] == [418] * 4
    assert {r.json()["message"] for r in responses} == {"I am a teapot"}
    assert len({r.headers["x-request-id"] for r in responses}) == 4


def test_restart_backoff_grows_as_fibonacci_up_to_its_cap() -> None:
    from server.workers.supervisor import MAX_BACKOFF, backoff

    assert [backoff(n) for n in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]
    assert backoff(100) == MAX_BACKOFF
