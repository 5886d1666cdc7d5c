"""Faults under load against a real server (issue 6 §5): a worker killed with SIGKILL, overload,
scaling down and unregistering mid-flight, ``serve --stop`` under load, and malformed input.

Every scenario is bounded by a request count and an overall deadline and talks only to
127.0.0.1. Load comes from httpx's AsyncClient; a request left unanswered for REQUEST_TIMEOUT
seconds shows up as a transport error, which the assertions treat as a hang.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import signal
import socket
import statistics
import tarfile
import time
import zipfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from archiver import MANIFEST_PATH
from server.workers.supervisor import no_worker_message
from tests.conftest import Model, Server, ServerFactory, alive, make_mar, zip_archive

REQUEST_TIMEOUT = 30.0  # a request unanswered this long has hung
SCENARIO_TIMEOUT = 60.0  # no scenario may take longer, whatever the server does
CONCURRENCY = 16


# -- load ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: when it was sent, how long it took, and its answer or its transport error."""

    started: float
    seconds: float
    status: int | None = None  # None: no HTTP response came
    payload: Any = None  # the JSON body, or the raw bytes when it is not JSON
    error: str | None = None  # the transport error's class name

    @property
    def pid(self) -> int:
        return int(self.payload["pid"])


async def send(client: httpx.AsyncClient, url: str, body: bytes) -> Outcome:
    started = time.monotonic()
    try:
        response = await client.post(url, content=body)
    except httpx.TransportError as exc:
        return Outcome(started, time.monotonic() - started, error=type(exc).__name__)
    try:
        payload = response.json()
    except ValueError:
        payload = response.content
    return Outcome(started, time.monotonic() - started, response.status_code, payload)


def new_client(connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=httpx.Limits(max_connections=connections))


class Load:
    """``concurrency`` clients, each sending its next request as soon as the last one is answered.

    A body is ``"<sleep> c<client>-<n>"`` for the fault handler. After an answer other than 200 a
    client pauses, as a real one would, so a model answering only errors is not flooded. A client
    stops when ``stop`` is set, when ``limit`` requests were sent in all, or when ``last`` says its
    latest outcome was its last.
    """

    def __init__(
        self,
        url: str,
        *,
        sleep: float,
        concurrency: int = CONCURRENCY,
        limit: int = 2000,
        last: Callable[[Outcome], bool] = lambda outcome: False,
    ) -> None:
        self.url = url
        self.sleep = sleep
        self.concurrency = concurrency
        self.limit = limit
        self.last = last
        self.outcomes: list[Outcome] = []
        self.stop = asyncio.Event()

    async def run(self) -> list[Outcome]:
        async with new_client(self.concurrency) as client:
            await asyncio.gather(*(self._client(client, n) for n in range(self.concurrency)))
        return self.outcomes

    async def _client(self, client: httpx.AsyncClient, n: int) -> None:
        sent = 0
        while not self.stop.is_set() and len(self.outcomes) < self.limit:
            outcome = await send(client, self.url, f"{self.sleep} c{n}-{sent}".encode())
            sent += 1
            self.outcomes.append(outcome)
            if self.last(outcome):
                return
            if outcome.status != 200:
                await asyncio.sleep(0.1)

    def successes(self, since: float = 0.0) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200 and o.started >= since]


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def scenario(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, SCENARIO_TIMEOUT))


def assert_answered(outcomes: list[Outcome]) -> None:
    """Every request got an HTTP answer (none hung or was dropped), and every error is TorchServe's JSON."""
    unanswered = [o for o in outcomes if o.status is None]
    assert not unanswered, f"{len(unanswered)} of {len(outcomes)} requests got no answer: {unanswered[:3]}"
    for outcome in outcomes:
        if outcome.status != 200:
            assert isinstance(outcome.payload, dict), outcome
            assert set(outcome.payload) == {"code", "type", "message"}, outcome
            assert outcome.payload["code"] == outcome.status, outcome


def statuses(outcomes: list[Outcome]) -> set[int | None]:
    return {o.status for o in outcomes}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def started_bodies(server: Server) -> set[str]:
    """Bodies (first lines) that reached a fault handler in this server."""
    log = server.tmp / "fault_started.log"
    return set(log.read_text().splitlines()) if log.exists() else set()


def worker_processes_of(server: Server) -> list[int]:
    """Any live worker process of this server, orphaned or not: its working directory is in the server's TMPDIR."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"server.worker" in cmdline and cwd.startswith(str(server.tmp)) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


# -- the shared server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults(start_module_server: ServerFactory) -> Server:
    # A serve process: these tests measure the frontend's memory, check that it is still alive,
    # and load it from a client that must not share its interpreter.
    return start_module_server(models=[Model("echo", "echo_handler.py")], name="faults", subprocess=True)


def register(server: Server, name: str, *, config: str | None = None, **params: object) -> None:
    spec: dict[str, object] = {}
    if config is not None:
        path = server.root / f"{name}-config.yaml"
        path.write_text(config)
        spec["config_file"] = str(path)
    make_mar(server.store, name, "fault_handler.py", **spec)
    response = server.register(f"{name}.mar", **params)
    assert response.status_code == 200, response.text


def model_pids(server: Server, name: str) -> list[int]:
    response = server.http.get(f"{server.management}/models/{name}")
    assert response.status_code == 200, response.text
    return [worker["pid"] for worker in response.json()[0]["workers"]]


# -- kill -9 of a worker under load ----------------------------------------------------------------


def test_worker_killed_under_load_comes_back(faults: Server) -> None:
    register(faults, "steady", batch_size=4, max_batch_delay=5)
    url = f"{faults.inference}/predictions/steady"

    async def run() -> tuple[int, float, list[Outcome]]:
        load = Load(url, sleep=0.01)
        running = asyncio.create_task(load.run())
        await until(lambda: len(load.successes()) >= 30, 20, "successes before the kill")
        [victim] = {o.pid for o in load.successes()}
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        await until(lambda: len(load.successes(since=killed_at)) >= 30, 40, "successes from a new worker")
        load.stop.set()
        return victim, killed_at, await running

    victim, killed_at, outcomes = scenario(run())
    assert_answered(outcomes)
    failures = [o for o in outcomes if o.status != 200]
    assert all(o.status is not None and o.status >= 500 for o in failures), failures
    assert all(o.payload["message"] == "Worker died." for o in failures), failures
    # The kill fails at most the batch in hand: everything queued waits for the next worker.
    assert len(failures) <= 4, failures
    assert not alive(victim)
    after = {o.pid for o in outcomes if o.status == 200 and o.started >= killed_at}
    assert after and victim not in after
    assert after <= set(faults.worker_pids())


# -- overload ----------------------------------------------------------------------------------------


def test_overload_gets_fast_503s_while_ping_answers_and_memory_stays_bounded(faults: Server) -> None:
    # One worker, one request at a time, 200 ms each: 5 requests/s, and 8 may wait.
    register(faults, "capped", config="jobQueueSize: 8\n", batch_size=1, max_batch_delay=0)
    url = f"{faults.inference}/predictions/capped"
    rate, seconds = 20, 4.0  # 4x capacity
    # Big bodies, so that queueing them without bound would show in the frontend's memory.
    padding = b"\n" + b"p" * (1 << 20)
    assert faults.process is not None
    frontend = faults.process.pid

    async def offer(client: httpx.AsyncClient, stop: asyncio.Event) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sends = []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            sends.append(asyncio.create_task(send(client, url, f"0.2 r{i}".encode() + padding)))
        try:
            return await asyncio.gather(*sends)
        finally:
            stop.set()

    async def ping(stop: asyncio.Event) -> list[Outcome]:
        pings = []
        async with new_client(1) as client:
            while not stop.is_set():
                pings.append(await send(client, f"{faults.inference}/ping", b""))
                await asyncio.sleep(0.05)
        return pings

    async def sample_rss(stop: asyncio.Event) -> int:
        peak = 0
        while not stop.is_set():
            peak = max(peak, rss_bytes(frontend))
            await asyncio.sleep(0.02)
        return peak

    async def run() -> tuple[list[Outcome], list[Outcome], int]:
        stop = asyncio.Event()
        async with new_client(256) as client:
            # A short burst first, so the baseline includes what serving bodies this big always costs.
            await asyncio.gather(*(send(client, url, b"0 warm" + padding) for _ in range(8)))
            baseline = rss_bytes(frontend)
            outcomes, pings, peak = await asyncio.gather(offer(client, stop), ping(stop), sample_rss(stop))
        return outcomes, pings, peak - baseline

    outcomes, pings, growth = scenario(run())
    assert_answered(outcomes)
    assert statuses(outcomes) <= {200, 503}
    served = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    assert served, "nothing was served under overload"
    assert len(refused) >= len(outcomes) // 2, (len(served), len(refused))
    assert {o.payload["type"] for o in refused} == {"ServiceUnavailableException"}
    assert {o.payload["message"] for o in refused} == {no_worker_message("capped", None)}
    # Refused at once, not after waiting behind the queue as the served ones did.
    assert statistics.median(o.seconds for o in refused) < statistics.median(o.seconds for o in served) / 4
    assert len(pings) >= 10 and statuses(pings) == {200}
    assert growth < 32 << 20, f"the frontend grew by {growth >> 20} MiB under overload"
    # The queue drains and the model serves again.
    assert faults.predict("capped", b"0 after").status_code == 200


# -- scaling down and unregistering with requests in flight ----------------------------------------


def test_scaling_down_and_unregistering_under_load_answer_every_request(faults: Server) -> None:
    register(faults, "busy", initial_workers=3, batch_size=1, max_batch_delay=0)
    url = f"{faults.inference}/predictions/busy"
    scaled: dict[int, list[int]] = {}

    async def run() -> tuple[float, list[Outcome]]:
        # Each client ends once the model is gone for it.
        load = Load(url, sleep=0.05, last=lambda outcome: outcome.status == 404)
        running = asyncio.create_task(load.run())
        async with new_client(1) as management:

            async def scale_to(workers: int) -> None:
                response = await management.put(
                    f"{faults.management}/models/busy", params={"min_worker": workers, "synchronous": "true"}
                )
                assert response.status_code == 200, response.text
                scaled[workers] = await asyncio.to_thread(model_pids, faults, "busy")

            await until(lambda: len(load.successes()) >= 20, 30, "successes on three workers")
            await scale_to(1)
            mark = time.monotonic()
            await until(lambda: len(load.successes(since=mark)) >= 20, 30, "successes on one worker")
            await scale_to(0)
            mark = time.monotonic()
            # With no worker left, what was queued is answered, and so is what comes after.
            await until(lambda: any(o.status == 503 and o.started >= mark for o in load.outcomes), 20, "503s")
            await scale_to(2)
            mark = time.monotonic()
            await until(lambda: len(load.successes(since=mark)) >= 20, 30, "successes on two workers")
            unregistering = time.monotonic()
            response = await management.delete(f"{faults.management}/models/busy")
            assert response.status_code == 200, response.text
        return unregistering, await running

    unregistering, outcomes = scenario(run())
    assert_answered(outcomes)
    assert statuses(outcomes) <= {200, 404, 503}
    assert [len(scaled[workers]) for workers in (1, 0, 2)] == [1, 0, 2]
    not_found = [o for o in outcomes if o.status == 404]
    assert len(not_found) == CONCURRENCY  # each client ended on one
    assert all(o.started + o.seconds >= unregistering for o in not_found)
    assert {o.payload["message"] for o in not_found} == {"Model not found: busy"}
    assert not any(alive(pid) for pids in scaled.values() for pid in pids)


def test_scaling_to_zero_answers_the_queued_requests(faults: Server) -> None:
    register(faults, "drained", batch_size=1, max_batch_delay=0)
    url = f"{faults.inference}/predictions/drained"

    async def run() -> list[Outcome]:
        async with new_client(8) as client:
            sends = [asyncio.create_task(send(client, url, f"1 q{i}".encode())) for i in range(4)]
            await until(lambda: started_bodies(faults) & {f"1 q{i}" for i in range(4)}, 10, "a request in the worker")
            # The worker holds the next batch too (maxBatchesInFlight 2).
            for _ in range(100):
                described = (await client.get(f"{faults.management}/models/drained")).json()
                if described[0]["workers"][0]["batchesInFlight"] == 2:
                    break
                await asyncio.sleep(0.05)
            response = await client.put(
                f"{faults.management}/models/drained", params={"min_worker": 0, "synchronous": "true"}
            )
            assert response.status_code == 200, response.text
            return await asyncio.gather(*sends)

    outcomes = scenario(run())
    assert_answered(outcomes)
    # The one running and the one held in the worker finish; the queued ones are told at once
    # that no worker is left.
    assert sorted(o.status for o in outcomes) == [200, 200, 503, 503]  # type: ignore[type-var]
    assert {o.payload["message"] for o in outcomes if o.status == 503} == {no_worker_message("drained", None)}


# -- serve --stop under load -----------------------------------------------------------------------


def test_stop_under_load_finishes_in_flight_requests_and_leaves_no_worker(tmp_path: Path) -> None:
    server = Server(tmp_path).start()
    try:
        register(server, "stopping", initial_workers=2, batch_size=1, max_batch_delay=0)
        url = f"{server.inference}/predictions/stopping"

        async def run() -> tuple[float, tuple[int, str], list[Outcome], list[int]]:
            # Once the server is gone, a client's next request cannot connect; that ends it.
            load = Load(url, sleep=0.05, last=lambda outcome: outcome.status is None)
            running = asyncio.create_task(load.run())
            await until(lambda: len(load.successes()) >= 30, 20, "successes before the stop")
            workers = server.worker_pids()
            stopping = time.monotonic()
            stop = await asyncio.create_subprocess_exec(
                *server.command("--stop"), env=server.env, cwd=server.root,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            output, _ = await stop.communicate()
            assert stop.returncode is not None
            return stopping, (stop.returncode, output.decode()), await running, workers

        stopping, (code, output), outcomes, workers = scenario(run())
        assert (code, output.strip()) == (0, "marserve has stopped."), output
        assert server.process is not None and server.process.wait(timeout=10) == 0
        reached = started_bodies(server)
        for outcome in outcomes:
            if outcome.status is None:
                # Only once the stop began may a request find the server gone, and never by hanging.
                assert outcome.error in ("ConnectError", "RemoteProtocolError", "ReadError", "WriteError"), outcome
                assert outcome.started + outcome.seconds >= stopping, outcome
            else:
                assert outcome.status == 200 or outcome.status >= 500, outcome
        # What reached a worker was finished and answered.
        answered = {o.payload["body"] for o in outcomes if o.status == 200}
        assert reached <= answered, sorted(reached - answered)[:5]
        assert len(workers) == 2 and not any(alive(pid) for pid in workers)
        assert worker_processes_of(server) == []
    finally:
        server.stop()


# -- malformed HTTP ----------------------------------------------------------------------------------


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and return what comes back up to the end of the first response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all; the answer may still be there
        received = b""
        while True:
            head, sep, rest = received.partition(b"\r\n\r\n")
            if sep and len(rest) >= content_length(head):
                return received
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def assert_up(server: Server) -> None:
    assert server.process is not None and server.process.poll() is None, "the server died"
    assert server.http.get(f"{server.inference}/ping").json() == {"status": "Healthy"}


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="garbage-request-line"),
        pytest.param(bytes(range(256)), id="binary"),
        pytest.param(b"GET /ping HTTP/9.9\r\nHost: x\r\n\r\n", id="unknown-version"),
        pytest.param(b"GET /ping HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n", id="header-without-colon"),
        pytest.param(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n", id="bad-length"),
        pytest.param(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", id="negative-length"),
        pytest.param(
            b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(b"GET /ping?" + b"q" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="huge-url"),
        pytest.param(
            b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nabc", id="oversized-body"
        ),
        pytest.param(
            b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 100_000 + b"\r\n\r\n",
            id="huge-header",
        ),
        pytest.param(
            b"GET /ping HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + b"\r\n",
            id="many-headers",
        ),
    ],
)
def test_malformed_http_is_a_4xx(faults: Server, request_bytes: bytes) -> None:
    status = status_of(raw_exchange(faults.ports[0], request_bytes))
    assert_up(faults)
    assert 400 <= status < 500, status


MULTIPART = (
    b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\nContent-Type: text/plain\r\n\r\nfirst\r\n'
    b'--XyZ\r\nContent-Disposition: form-data; name="b"; filename="b.bin"\r\n\r\n\x00\x01binary\r\n'
    b"--XyZ--\r\n"
)


@pytest.mark.parametrize("cut", [10, 40, 70, MULTIPART.index(b"first") + 2, MULTIPART.index(b"--XyZ--") + 3])
def test_truncated_multipart_is_400(faults: Server, cut: int) -> None:
    body = MULTIPART[:cut]
    head = (
        b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    response = raw_exchange(faults.ports[0], head + body)
    assert status_of(response) == 400, response
    error = json.loads(response.partition(b"\r\n\r\n")[2])
    assert error["type"] == "BadRequestException"
    assert error["message"].startswith("Invalid multipart/form request")
    assert_up(faults)


def test_deeply_nested_json_prediction_does_not_kill_the_worker(faults: Server) -> None:
    [pid] = model_pids(faults, "echo")
    nested = b"[" * 100_000 + b"]" * 100_000
    response = faults.predict("echo", nested, headers={"content-type": "application/json"})
    # Too deep to decode is the same as not JSON: the handler gets the bytes.
    assert response.status_code == 200, response.text
    assert response.content == nested
    assert model_pids(faults, "echo") == [pid] and alive(pid)


# -- invalid registrations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'"echo.mar"',
        b"\xff\xfe\x00garbage",
        b'{"url": "echo.mar"} {"url": "echo.mar"}',
        b'{"url": 5}',
        b'{"url": {"nested": ["echo.mar"]}}',
        b'{"url": "../../etc/passwd"}',
        b'{"url": "/etc/passwd"}',
        b'{"url": "echo.mar\\u0000"}',
        b'{"url\\u0000": "echo.mar"}',
        b'{"url": "echo.mar", "batch_size": "many"}',
        b'{"url": "echo.mar", "batch_size": 1e999}',
        b'{"url": "echo.mar", "synchronous": "maybe"}',
        b'{"url": "echo.mar", "runtime": "java"}',
        b'{"url": "echo.mar", "model_name": "../evil-faults"}',
        pytest.param(
            b"[" * 100_000,
            id="nested-too-deep",
        ),
    ],
)
def test_invalid_json_registration_is_a_4xx(faults: Server, body: bytes) -> None:
    response = faults.http.post(
        f"{faults.management}/models", content=body, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text
    error = response.json()
    assert set(error) == {"code", "type", "message"} and error["code"] == response.status_code
    assert "\n" not in error["message"]
    assert_up(faults)


# -- hostile archives --------------------------------------------------------------------------------

MANIFEST = json.dumps(
    {"runtime": "python", "model": {"modelName": "hostile", "handler": "fault_handler.py", "modelVersion": "1.0"}}
)


hostile_zip = functools.partial(zip_archive, manifest=MANIFEST)


def hostile_tar(path: Path, *members: tuple[str, bytes, str]) -> Path:
    """Members are (name, data, link); a link is "sym:<target>" or "hard:<target>", or "" for a file."""
    with tarfile.open(path, "w:gz") as archive:
        manifest = MANIFEST.encode()
        info = tarfile.TarInfo(MANIFEST_PATH)
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            kind, _, target = link.partition(":")
            if kind:
                info.type, info.linkname = (tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE), target
            else:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def zip_bomb(path: Path, declared: int, real: int) -> Path:
    """A zip whose one entry says it inflates to ``declared`` bytes; its data inflates to ``real``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST_PATH, MANIFEST)
        archive.writestr("weights.bin", bytes(real))
        # The central directory is written on close, from these records.
        archive.infolist()[-1].file_size = declared
    return path


def many_entries(path: Path, count: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(MANIFEST_PATH, MANIFEST)
        for i in range(count):
            archive.writestr(f"f/{i}", b"")
    return path


def hostile_archives(store: Path, outside: Path) -> dict[str, Path]:
    """Archives that try to escape, exhaust or crash the extractor, by name; ``outside`` must stay untouched."""
    canary = outside / "canary.txt"
    slip = "../" * 6 + "evil-faults-slip"
    return {
        "zip-slip": hostile_zip(store / "slip.mar", (slip, b"pwned"), ("a/" + slip, b"pwned")),
        "zip-absolute": hostile_zip(store / "absolute.mar", (str(outside / "evil-faults-abs"), b"pwned")),
        "zip-symlink-out": hostile_zip(store / "symlink.mar", symlinks={"weights.pt": str(canary)}),
        "zip-symlink-up": hostile_zip(store / "symlink-up.mar", symlinks={"weights.pt": "../" * 6 + "etc/passwd"}),
        "zip-write-through-symlink": hostile_zip(
            store / "through.mar", ("escape/evil-faults-through", b"pwned"), symlinks={"escape": str(outside)}
        ),
        "zip-link-chain": hostile_zip(store / "chain.mar", symlinks={"x": "y/..", "y": "."}),
        "zip-link-with-nul": hostile_zip(store / "nul.mar", symlinks={"weights.pt": "a\x00/../../evil-faults-nul"}),
        "zip-bomb": zip_bomb(store / "bomb.mar", declared=64 << 30, real=16 << 20),
        "zip-lying-sizes": zip_bomb(store / "lying.mar", declared=1024, real=16 << 20),
        "zip-too-many-entries": many_entries(store / "many.mar", 10_001),
        "tar-slip": hostile_tar(store / "slip.tar.gz", (slip, b"pwned", "")),
        "tar-absolute": hostile_tar(store / "absolute.tar.gz", (str(outside / "evil-faults-abs"), b"pwned", "")),
        "tar-symlink-then-file": hostile_tar(
            store / "overwrite.tar.gz", ("weights.pt", b"", f"sym:{canary}"), ("weights.pt", b"pwned", "")
        ),
        "tar-hardlink-out": hostile_tar(store / "hardlink.tar.gz", ("weights.pt", b"", f"hard:{canary}")),
        "not-an-archive": _write(store / "random.mar", os.urandom(4096)),
        "empty": _write(store / "empty.mar", b""),
        "truncated-zip": _write(
            store / "truncated.mar", hostile_zip(store / "whole.zip", ("w.pt", os.urandom(8192))).read_bytes()[:3000]
        ),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_hostile_archives_are_400_and_write_nothing_outside(faults: Server) -> None:
    outside = faults.root.parent / f"outside-{faults.root.name}"
    outside.mkdir()
    (outside / "canary.txt").write_text("canary")
    archives = hostile_archives(faults.store, outside)
    extracted_before = set(faults.tmp.glob("marserve-*/marserve-model-*"))
    for label, archive in archives.items():
        response = faults.register(archive.name, initial_workers=0)
        assert response.status_code == 400, (label, response.text)
        error = response.json()
        assert error["type"] == "InvalidModelException", (label, error)
        assert archive.name in error["message"] and "\n" not in error["message"], (label, error)
        assert_up(faults)
    # Nothing landed outside: not next to the server, not above it, not in /tmp; the canary is intact.
    escaped = [
        path
        for place in (faults.root, *faults.root.parents[:3], Path("/tmp"))
        for path in (place.rglob("evil-faults*") if place == faults.root else place.glob("evil-faults*"))
    ]
    assert escaped == []
    assert sorted(p.name for p in outside.iterdir()) == ["canary.txt"]
    assert (outside / "canary.txt").read_text() == "canary"
    # Each refused archive's extraction directory was removed.
    assert set(faults.tmp.glob("marserve-*/marserve-model-*")) == extracted_before
    assert "hostile" not in registered_names(faults)


def registered_names(server: Server) -> list[str]:
    return [m["modelName"] for m in server.http.get(f"{server.management}/models").json()["models"]]
