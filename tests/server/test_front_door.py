"""The front door on its own: a listener with routes of a protocol it has never heard of gets
the whole request policy (request ids, tokens, body limits, headers, counters, the access log)
without any of it written again, and answers routes that reply at once, with a future or with a
coroutine. Real sockets, a real HTTP client; no model server around it."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server.config import Address
from server.errors import BadRequest, ServerError
from server.http.access_log import AccessLog
from server.http.auth import INFERENCE, TokenAuth
from server.http.connection import Door
from server.http.listener import Listener
from server.http.policy import RequestPolicy
from server.http.request import Request
from server.http.responses import Answer, PieceSink, Response, json_response
from server.http.routing import Route, Router, methods
from tests.conftest import free_port

LIMIT = 1000


class Counter:
    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.refusals: list[str] = []

    def response(self, status: int) -> None:
        self.statuses.append(status)

    def refused(self, reason: str) -> None:
        self.refusals.append(reason)


def plain_error(error: ServerError) -> Answer:
    """A dialect of our own: what a new protocol would plug in for its errors."""
    return Response(error.status_code, f"error: {error.message}".encode(), "text/plain")


class Pieces:
    """A streamed answer whose pieces a timer makes: ``n`` pieces of ``size`` bytes."""

    status, phrase, content_type = 200, "", "text/plain"
    headers = (("x-stream", "yes"),)

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, size: int, every: float, fail: bool) -> None:
        self.loop, self.left, self.size, self.every, self.fail = loop, n, size, every, fail
        self.sink: PieceSink | None = None
        self.sent = 0
        self.cancelled = False

    def attach(self, sink: PieceSink) -> None:
        self.sink = sink
        self.loop.call_soon(self._next)

    def cancel(self) -> None:
        self.cancelled = True

    def _next(self) -> None:
        if self.cancelled or self.sink is None:
            return
        if self.left == 0:
            self.sink.end("the producer died" if self.fail else None)
            return
        self.sink.piece(b"%d" % self.sent + b"." * (self.size - len(b"%d" % self.sent)))
        self.sent += 1
        self.left -= 1
        self.loop.call_later(self.every, self._next)


class FrontDoor:
    """A listener on a free port, served by an event loop in a thread."""

    def __init__(
        self, tmp: Path, with_auth: bool, *, read_timeout: float = 5, head_timeout: float = 10,
        min_body_rate: int = 16384, max_connections: int = 100,
    ) -> None:  # fmt: skip
        self.auth = TokenAuth(tmp / "key_file.json", 60) if with_auth else None
        self.counter = Counter()
        self.log = io.StringIO()
        self.loop = asyncio.new_event_loop()
        self.futures: list[asyncio.Future[Answer]] = []
        self.streams: list[Pieces] = []
        self.port = free_port()
        policy = RequestPolicy(
            auth=self.auth, max_request_size=LIMIT, metrics=self.counter, access_log=AccessLog(self.log),
            cors=(("access-control-allow-origin", "https://example.com"),),
        )  # fmt: skip
        router = Router(self.routes(), default_key=INFERENCE)
        door = Door(router, policy, read_timeout, head_timeout, min_body_rate, max_connections)
        self.listener = Listener("test", Address(scheme="http", host="127.0.0.1", port=self.port), door)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.listener.start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def routes(self) -> list[Route]:
        def now(request: Request) -> Response:
            return json_response({"id": request.request_id, "body": request.body.decode(), "q": request.query})

        def later(request: Request) -> asyncio.Future[Answer]:
            future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            self.futures.append(future)
            return future

        async def slowly(request: Request) -> Response:
            await asyncio.sleep(0.05)
            if request.body == b"fail":
                raise BadRequest("asked to fail")
            return Response(201, request.body[::-1], "text/plain", (("x-kind", "coroutine"),))

        def broken(request: Request) -> Response:
            raise RuntimeError("a bug")

        def stream(request: Request) -> Pieces:
            # ?n=pieces&size=bytes&every=seconds&fail=1: pieces made on a timer, as a worker would send them.
            query = request.query
            pieces = Pieces(self.loop, int(query.get("n", "3")), int(query.get("size", "5")), float(query.get("every", "0.01")),
                            fail=query.get("fail") == "1")  # fmt: skip
            self.streams.append(pieces)
            return pieces

        return [
            Route("/v9/now", now, methods("POST", "GET"), INFERENCE, errors=plain_error),
            Route("/v9/later", later, methods("POST"), INFERENCE, errors=plain_error),
            Route("/v9/slowly", slowly, methods("POST"), INFERENCE, errors=plain_error),
            Route("/v9/broken", broken, methods("GET"), INFERENCE, errors=plain_error),
            Route("/v9/open", now, methods("GET"), None, reads_body=False, errors=plain_error),
            Route("/v9/stream", stream, methods("GET", "POST"), None, reads_body=False, errors=plain_error),
        ]

    def resolve(self, answer: Answer) -> None:
        def set_it() -> None:
            self.futures.pop(0).set_result(answer)

        self.loop.call_soon_threadsafe(set_it)

    def logged(self, text: str) -> bool:
        """Whether the access log holds ``text``, after writing out what it collected (on the
        loop: the line of a request is recorded after its response is sent)."""
        asyncio.run_coroutine_threadsafe(self._flush(), self.loop).result(10)
        return text in self.log.getvalue()

    async def _flush(self) -> None:
        self.listener.door.policy.access_log.flush()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.listener.stop(5), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def door(tmp_path: Path) -> Iterator[FrontDoor]:
    front = FrontDoor(tmp_path, with_auth=False)
    yield front
    front.close()


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[FrontDoor]:
    front = FrontDoor(tmp_path, with_auth=True)
    yield front
    front.close()


def test_a_route_answering_at_once_gets_the_policy_headers(door: FrontDoor) -> None:
    response = httpx.post(f"{door.url}/v9/now/?a=1&a=2&b=", content=b"hello")
    assert response.status_code == 200
    assert response.json() == {"id": response.headers["x-request-id"], "body": "hello", "q": {"a": "2", "b": ""}}
    assert response.headers["cache-control"] == "no-cache; no-store, must-revalidate, private"
    assert response.headers["access-control-allow-origin"] == "https://example.com"
    assert "date" in response.headers
    wait_until(lambda: door.logged('"POST /v9/now/" 200'))
    assert response.headers["x-request-id"] in door.log.getvalue()
    assert door.counter.statuses == [200]


def wait_until(condition: Callable[[], object]) -> None:
    for _ in range(500):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def read_all(sock: socket.socket, until: bytes) -> bytes:
    data = b""
    while until not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_a_route_answering_with_a_future_and_with_a_coroutine(door: FrontDoor) -> None:
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(b"POST /v9/later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
        wait_until(lambda: door.futures)
        # The connection waits for the future; another connection is not held up meanwhile.
        assert httpx.post(f"{door.url}/v9/slowly", content=b"abc").content == b"cba"
        door.resolve(Response(202, b"done", "text/plain", (("x-extra", "1"), ("content-length", "99"))))
        answer = read_all(sock, b"done")
    assert answer.startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert b"x-extra: 1\r\n" in answer and b"content-length: 4\r\n" in answer and b"content-length: 99" not in answer
    reply = httpx.post(f"{door.url}/v9/slowly", content=b"abc")
    assert (reply.status_code, reply.headers["x-kind"], reply.headers["content-type"]) == (201, "coroutine", "text/plain")


def test_errors_are_rendered_in_the_routes_dialect(door: FrontDoor) -> None:
    assert httpx.post(f"{door.url}/v9/slowly", content=b"fail").text == "error: asked to fail"
    broken = httpx.get(f"{door.url}/v9/broken")
    assert (broken.status_code, broken.text) == (500, "error: RuntimeError: a bug")
    wrong_method = httpx.delete(f"{door.url}/v9/now")
    assert (wrong_method.status_code, wrong_method.text) == (405, "error: Requested method is not allowed, please refer to API document.")
    # A path no route has is the listener's 404, in TorchServe's JSON.
    assert httpx.get(f"{door.url}/v9/nothing").json()["code"] == 404


def test_body_limits_apply_to_every_route(door: FrontDoor) -> None:
    declared = httpx.post(f"{door.url}/v9/now", content=b"x" * (LIMIT + 1))
    assert (declared.status_code, declared.text) == (413, f"error: Request body of {LIMIT + 1} bytes exceeds max_request_size ({LIMIT})")
    chunked = httpx.post(f"{door.url}/v9/now", content=iter([b"x" * 600, b"y" * 600]))
    assert (chunked.status_code, chunked.text) == (413, f"error: Request body exceeds max_request_size ({LIMIT})")
    assert httpx.post(f"{door.url}/v9/now", content=iter([b"x" * 500, b"y" * 500])).json()["body"] == "x" * 500 + "y" * 500


def test_tokens_apply_to_every_route_that_names_a_key(locked: FrontDoor) -> None:
    assert locked.auth is not None
    refused = httpx.post(f"{locked.url}/v9/now", content=b"x")
    assert (refused.status_code, refused.headers["www-authenticate"]) == (401, "Bearer")
    # Unknown paths need the listener's key too, so they tell a client without one nothing.
    assert httpx.get(f"{locked.url}/v9/nothing").status_code == 401
    assert httpx.get(f"{locked.url}/v9/open").status_code == 200
    key = locked.auth._keys[INFERENCE].value.decode()
    allowed = httpx.post(f"{locked.url}/v9/now", content=b"x", headers={"Authorization": f"Bearer {key}"})
    assert allowed.status_code == 200


def test_pipelined_requests_of_all_kinds_are_answered_in_order(door: FrontDoor) -> None:
    requests = [
        b"POST /v9/slowly HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /v9/open HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v9/now HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
        b"GET /v9/nothing HTTP/1.1\r\nHost: x\r\n\r\n",
    ] * 50
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(b"".join(requests))
        data = b""
        while data.count(b"HTTP/1.1 ") < len(requests):
            chunk = sock.recv(65536)
            assert chunk, data[-500:]
            data += chunk
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == [201, 200, 200, 404] * 50


def test_a_client_that_leaves_cancels_its_future(door: FrontDoor) -> None:
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(b"POST /v9/later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
        wait_until(lambda: door.futures)
        future = door.futures[0]
    wait_until(future.cancelled)
    wait_until(lambda: door.logged('"POST /v9/later" 499'))


def test_something_that_is_not_http_is_a_json_400(door: FrontDoor) -> None:
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b'"type": "BadRequestException"' in data and b"connection: close" in data


# -- clients that trickle, stall or crowd ---------------------------------------------------------


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock`` (reading whatever it sent); fails after ``seconds``."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {seconds} s") from None
    return time.monotonic() - started


def test_a_head_trickled_byte_by_byte_is_closed_at_its_deadline(tmp_path: Path) -> None:
    front = FrontDoor(tmp_path, False, read_timeout=30, head_timeout=1)
    try:
        request = b"GET /v9/open HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100
        with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
            started = time.monotonic()
            # Never silent for long (read_timeout is 30 s), yet the head is never done.
            for byte in request:
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                if time.monotonic() - started > 3:
                    break
                time.sleep(0.05)
            assert closed_within(sock, 5) + (time.monotonic() - started) < 4
        wait_until(lambda: front.counter.refusals == ["head_timeout"])
        # A whole head in time is served.
        assert httpx.get(f"{front.url}/v9/open").status_code == 200
    finally:
        front.close()


def test_a_body_slower_than_the_minimum_rate_is_closed(tmp_path: Path) -> None:
    front = FrontDoor(tmp_path, False, read_timeout=30, head_timeout=1, min_body_rate=1000, max_connections=10)
    try:
        with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
            sock.sendall(b"POST /v9/now HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n")
            started = time.monotonic()
            # 50 bytes a second, against a minimum of 1000 after a second's grace: due after 1.05 s or so.
            for _ in range(40):
                try:
                    sock.sendall(b"x" * 5)
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.1)
            assert time.monotonic() - started + closed_within(sock, 5) < 3
        wait_until(lambda: front.counter.refusals == ["body_too_slow"])
        # A body at the rate, and beyond its grace, is served.
        body = iter([b"x" * 250] * 4)
        assert httpx.post(f"{front.url}/v9/now", content=body).json()["body"] == "x" * 1000
    finally:
        front.close()


def test_at_the_connection_cap_the_oldest_idle_or_headless_connection_makes_room(tmp_path: Path) -> None:
    front = FrontDoor(tmp_path, False, read_timeout=30, head_timeout=30, max_connections=20)
    crowd = []
    try:
        for _ in range(60):
            sock = socket.create_connection(("127.0.0.1", front.port), timeout=10)
            sock.sendall(b"G")  # a head begun and never finished
            crowd.append(sock)
        # Served, although 60 connections were made before it and none of them finished a head.
        assert httpx.get(f"{front.url}/v9/open").status_code == 200
        wait_until(lambda: len(front.listener.door.connections) <= 20)
        closed = sum(1 for sock in crowd if _closed(sock))
        assert closed >= 40
        assert front.counter.refusals.count("evicted") >= 40
    finally:
        for sock in crowd:
            sock.close()
        front.close()


def test_at_the_cap_a_connection_is_refused_when_every_other_is_being_answered(tmp_path: Path) -> None:
    front = FrontDoor(tmp_path, False, max_connections=2)
    busy = []
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", front.port), timeout=10)
            sock.sendall(b"POST /v9/later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            busy.append(sock)
        wait_until(lambda: len(front.futures) == 2)
        with socket.create_connection(("127.0.0.1", front.port), timeout=10) as third:
            assert closed_within(third, 5) < 5
        assert front.counter.refusals == ["connection_cap"]
        # The requests being answered were not disturbed.
        for _ in busy:
            front.resolve(Response(200, b"fine"))
        assert all(read_all(sock, b"fine").endswith(b"fine") for sock in busy)
    finally:
        for sock in busy:
            sock.close()
        front.close()


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.3)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- streamed answers --------------------------------------------------------------------------


def test_a_streamed_answer_is_chunked_piece_by_piece_and_the_connection_stays_usable(door: FrontDoor) -> None:
    with httpx.Client() as client:
        with client.stream("GET", f"{door.url}/v9/stream?n=5&size=4") as response:
            assert response.headers["transfer-encoding"] == "chunked" and response.headers["x-stream"] == "yes"
            assert "content-length" not in response.headers
            assert b"".join(response.iter_bytes()) == b"0...1...2...3...4..."
        assert door.streams[0].sent == 5
        # Keep-alive: the same connection serves the next request.
        assert client.get(f"{door.url}/v9/open").status_code == 200
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(b"GET /v9/stream?n=3&size=4 HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = read_all(sock, b"0\r\n\r\n")
    assert raw.endswith(b"\r\n\r\n4\r\n0...\r\n4\r\n1...\r\n4\r\n2...\r\n0\r\n\r\n")


def test_a_streamed_answer_to_http_1_0_ends_with_the_connection(door: FrontDoor) -> None:
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(b"GET /v9/stream?n=3&size=4 HTTP/1.0\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head and b"connection: close" in head
    assert body == b"0...1...2..."


def test_a_broken_stream_has_no_terminating_chunk(door: FrontDoor) -> None:
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(b"GET /v9/stream?n=2&size=4&fail=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert raw.endswith(b"4\r\n0...\r\n4\r\n1...\r\n")  # and then the connection closed


def test_a_client_that_leaves_mid_stream_stops_its_producer(door: FrontDoor) -> None:
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(b"GET /v9/stream?n=1000&size=4&every=0.01 HTTP/1.1\r\nHost: x\r\n\r\n")
        read_all(sock, b"4\r\n3...")
    wait_until(lambda: door.streams[0].cancelled)
    sent = door.streams[0].sent
    time.sleep(0.1)
    assert door.streams[0].sent == sent < 1000
    wait_until(lambda: door.logged('"GET /v9/stream" 499'))


def test_a_slow_reader_gets_its_stream_cut_at_the_buffer_bound(tmp_path: Path) -> None:
    front = FrontDoor(tmp_path, False)
    front.listener.door.stream_buffer = 256 * 1024
    try:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.settimeout(10)
        reader.connect(("127.0.0.1", front.port))
        # 200 pieces of 64 KiB, one every millisecond, to a client that reads nothing for now.
        reader.sendall(b"GET /v9/stream?n=200&size=65536&every=0.001 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: front.streams and front.streams[0].cancelled)
        # Cut well before the end: the server held at most the bound (plus the kernel's buffers).
        assert front.streams[0].sent < 200
        reader.close()
        assert httpx.get(f"{front.url}/v9/open").status_code == 200
    finally:
        front.close()
