"""Limits on what clients send and what handlers answer, against a real server.

Request bodies (``max_request_size``, on every port), handler responses (``max_response_size``),
request heads, form parts, and clients that send or read slowly, or stall.
"""

from __future__ import annotations

import re
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import Model, Server, ServerFactory

MAX_REQUEST = 65536
MAX_RESPONSE = 4 * 1024 * 1024
READ_TIMEOUT = 2

INFERENCE, MANAGEMENT, METRICS = 0, 1, 2


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    config = (
        f"max_request_size={MAX_REQUEST}\nmax_response_size={MAX_RESPONSE}\n"
        f"request_read_timeout={READ_TIMEOUT}\n"
    )
    models = [
        Model("echo", "echo_handler.py", initial_workers=1),
        Model("sized", "sized_handler.py", initial_workers=1, batch_size=4, max_batch_delay=300),
    ]
    return start_module_server(config, models, name="limits")


def url(srv: Server, port: int) -> str:
    return (srv.inference, srv.management, srv.metrics)[port]


def connect(srv: Server, port: int = INFERENCE) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.ports[port]), timeout=15)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response from a raw socket: its status and its body (read by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without answering: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert match, head
    while len(body) < int(match[1]):
        chunk = sock.recv(1 << 20)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(head.split()[1]), body


def assert_closed_without_answer(sock: socket.socket) -> None:
    # Bounded by the socket's timeout: a server that keeps the connection open fails the test.
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass  # closed with some of what was sent still unread


def error(response: httpx.Response, code: int, type_name: str) -> str:
    assert response.status_code == code, response.text
    body = response.json()
    assert (body["code"], body["type"]) == (code, type_name)
    return body["message"]


# -- max_request_size ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "method", "path", "content_type"),
    [
        (INFERENCE, "POST", "/predictions/echo", "application/octet-stream"),
        (INFERENCE, "PUT", "/explanations/echo/1.0", "application/octet-stream"),
        (INFERENCE, "GET", "/ping", "text/plain"),
        (INFERENCE, "OPTIONS", "/", "text/plain"),
        (INFERENCE, "POST", "/no/such/route", "text/plain"),
        (MANAGEMENT, "POST", "/models", "application/json"),
        (MANAGEMENT, "GET", "/models", "application/json"),
        (MANAGEMENT, "PUT", "/models/echo", "text/plain"),
        (METRICS, "GET", "/metrics", "text/plain"),
    ],
)
def test_declared_body_over_max_request_size_is_413_on_every_port(
    srv: Server, port: int, method: str, path: str, content_type: str
) -> None:
    response = srv.http.request(
        method, url(srv, port) + path, content=b"x" * (MAX_REQUEST + 1), headers={"Content-Type": content_type}
    )
    message = error(response, 413, "PayloadTooLargeException")
    assert message == f"Request body of {MAX_REQUEST + 1} bytes exceeds max_request_size ({MAX_REQUEST})"
    # The connection stays usable; the rest of the body was read and dropped.
    assert srv.http.get(f"{srv.inference}/ping").status_code == 200


def test_body_of_exactly_max_request_size_is_served(srv: Server) -> None:
    body = bytes(range(256)) * (MAX_REQUEST // 256)
    response = srv.predict("echo", body, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200
    assert response.content == body


@pytest.mark.parametrize(
    ("port", "path", "content_type", "status"),
    [
        (INFERENCE, "/predictions/echo", "application/octet-stream", 413),
        (MANAGEMENT, "/models", "application/json", 413),
        # A route that never reads the body answers without it; the rest is dropped unread.
        (INFERENCE, "/ping", "text/plain", 200),
    ],
)
def test_endless_chunked_body_is_answered_without_holding_it(
    srv: Server, port: int, path: str, content_type: str, status: int
) -> None:
    # The body never ends: the only way to answer is to stop at the limit (or not read it at all).
    sock = connect(srv, port)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock.sendall(head.encode())
    chunk = b"1000\r\n" + b"[" * 0x1000 + b"\r\n"
    sent = 0
    while not select.select([sock], [], [], 0)[0]:
        assert sent < 1000 * MAX_REQUEST, "no answer to an endless body"
        sock.sendall(chunk)
        sent += 0x1000
    answer = read_response(sock)
    assert answer[0] == status
    if status == 413:
        assert b'"message": "Request body exceeds max_request_size (65536)"' in answer[1]
    sock.close()


def test_chunked_body_under_the_limit_is_served(srv: Server) -> None:
    response = srv.predict("echo", iter([b"abc"] * 1000))  # an iterator: sent chunked
    assert response.status_code == 200
    assert response.content == b"abc" * 1000


# -- max_response_size ---------------------------------------------------------------------------


def test_response_over_max_response_size_fails_only_its_request(srv: Server) -> None:
    workers = srv.worker_pids()
    at_limit = srv.predict("sized", str(MAX_RESPONSE).encode())
    assert at_limit.status_code == 200
    assert at_limit.content == b"x" * MAX_RESPONSE
    over = srv.predict("sized", str(MAX_RESPONSE + 1).encode())
    message = error(over, 500, "InternalServerException")
    assert message == f"Response of {MAX_RESPONSE + 1} bytes exceeds max_response_size ({MAX_RESPONSE})"
    assert over.headers["content-type"] == "application/json"
    # The worker was neither killed nor restarted.
    assert srv.predict("sized", b"3").content == b"xxx"
    assert srv.worker_pids() == workers


def test_oversized_response_fails_alone_within_its_batch(srv: Server) -> None:
    sizes = [10, 3 * MAX_RESPONSE, 20, MAX_RESPONSE + 1]
    with ThreadPoolExecutor(len(sizes)) as pool:
        responses = list(pool.map(lambda n: srv.predict("sized", str(n).encode()), sizes))
    assert [r.status_code for r in responses] == [200, 500, 200, 500]
    assert (responses[0].content, responses[2].content) == (b"x" * 10, b"x" * 20)
    assert "exceeds max_response_size" in responses[1].json()["message"]


# -- request heads -------------------------------------------------------------------------------


def many_headers(count: int) -> bytes:
    return b"".join(b"X-H%d: v\r\n" % i for i in range(count))


@pytest.mark.parametrize("port", [INFERENCE, MANAGEMENT, METRICS])
@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (b"GET /ping HTTP/1.1\r\nHost: x\r\n" + many_headers(100) + b"\r\n", "more than 100 header fields"),
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", "exceed 65536 bytes"),
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n", "exceed 65536 bytes"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "exceed 65536 bytes"),
        (b"NOT HTTP AT ALL\r\n\r\n", ""),
    ],
    ids=["101-headers", "70k-header", "1m-header", "70k-url", "garbage"],
)
def test_oversized_or_malformed_request_head_is_json_400(
    srv: Server, port: int, request_bytes: bytes, message: str
) -> None:
    sock = connect(srv, port)
    try:
        sock.sendall(request_bytes)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before it was all sent; the answer is already waiting
    status, body = read_response(sock)
    assert status == 400
    assert re.match(rb'\{\n  "code": 400,\n  "type": "BadRequestException",\n  "message": "Invalid HTTP message', body)
    assert message.encode() in body
    assert_closed_without_answer(sock)
    sock.close()


def test_head_within_the_limits_is_served(srv: Server) -> None:
    headers = {f"X-H{i}": "v" for i in range(90)} | {"X-Big": "a" * 60_000}
    assert srv.http.get(f"{srv.inference}/ping", headers=headers).status_code == 200


# -- forms ---------------------------------------------------------------------------------------


def multipart(names: list[str], part_headers: str = "") -> tuple[bytes, dict[str, str]]:
    parts = [
        f'--b0undary\r\nContent-Disposition: form-data; name="{name}"\r\n{part_headers}\r\n{name}\r\n'
        for name in names
    ]
    body = "".join(parts) + "--b0undary--\r\n"
    return body.encode(), {"Content-Type": "multipart/form-data; boundary=b0undary"}


def test_multipart_part_count_is_capped(srv: Server) -> None:
    body, headers = multipart(["data"] + [f"p{i}" for i in range(63)])
    assert srv.predict("echo", body, headers=headers).content == b"data"
    body, headers = multipart(["data"] + [f"p{i}" for i in range(64)])
    message = error(srv.predict("echo", body, headers=headers), 400, "BadRequestException")
    assert message == "Invalid multipart/form request: more than 64 parts"


def test_multipart_part_headers_are_capped(srv: Server) -> None:
    body, headers = multipart(["data"], "".join(f"X-P{i}: v\r\n" for i in range(8)))
    message = error(srv.predict("echo", body, headers=headers), 400, "BadRequestException")
    assert message.startswith("Invalid multipart/form request: ")


def test_urlencoded_field_count_is_capped(srv: Server) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    fields = "&".join(["data=ok"] + [f"f{i}=1" for i in range(999)])
    assert srv.predict("echo", fields.encode(), headers=form).content == b"ok"
    message = error(srv.predict("echo", (fields + "&one=more").encode(), headers=form), 400, "BadRequestException")
    assert message == "Invalid form request: more than 1000 fields"
    separators = error(srv.predict("echo", b"&" * 60_000, headers=form), 400, "BadRequestException")
    assert separators == "Invalid form request: more than 1000 fields"


# -- slow and stalled clients --------------------------------------------------------------------


def test_stalled_body_holds_no_worker_and_is_closed(srv: Server) -> None:
    stalled = connect(srv)
    stalled.sendall(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    # echo has one worker; it serves others while the stalled body is still owed.
    for i in range(3):
        assert srv.predict("echo", b"%d" % i).content == b"%d" % i
    # After request_read_timeout seconds of silence the server closes; nothing reached the handler.
    assert_closed_without_answer(stalled)
    stalled.close()


def test_trickled_request_is_served_while_it_keeps_coming(srv: Server) -> None:
    request = b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nslow!"
    sock = connect(srv)
    # Longer in all than request_read_timeout, but never silent that long.
    for piece in (request[i : i + 12] for i in range(0, len(request), 12)):
        sock.sendall(piece)
        assert srv.predict("echo", b"other").content == b"other"
        time.sleep(READ_TIMEOUT / 4)
    assert read_response(sock) == (200, b"slow!")
    sock.close()


def test_connection_that_never_sends_a_request_is_closed(srv: Server) -> None:
    idle = connect(srv, MANAGEMENT)
    assert_closed_without_answer(idle)
    idle.close()


def test_slow_reader_holds_no_worker(srv: Server) -> None:
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.settimeout(15)
    reader.connect(("127.0.0.1", srv.ports[INFERENCE]))
    size = str(MAX_RESPONSE).encode()
    reader.sendall(b"POST /predictions/sized HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(size), size))
    # sized has one worker. The reader's answer (4 MiB) has begun to arrive, and it reads
    # nothing of it for now.
    assert select.select([reader], [], [], 15)[0]
    for n in (1, 2, 3):
        assert srv.predict("sized", b"%d" % n).content == b"x" * n
    # Nothing was lost for the slow reader either.
    assert read_response(reader) == (200, b"x" * MAX_RESPONSE)
    reader.close()
