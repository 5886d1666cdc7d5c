"""Predictions at the HTTP connection, where marserve answers them without ASGI: pipelining,
``Expect: 100-continue``, HTTP/1.0, HEAD, headers a handler must not forge, and clients that leave
before their turn."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Model, Server, ServerFactory, wait_for


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    models = [
        Model("echo", "echo_handler.py"),
        Model("types", "inf_types_handler.py"),
        # One worker taking one request at a time, so a second request waits in the queue.
        Model("slow", "fault_handler.py", batch_size=1, initial_workers=1),
    ]
    return start_module_server(models=models, name="connections")


def connect(srv: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.ports[0]), timeout=15)


def post(path: str, body: bytes, *headers: str, version: str = "1.1") -> bytes:
    head = f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    return (head + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode() + body


class Reader:
    """Responses off one raw connection, one at a time, framed by Content-Length."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"the server closed the connection; unread: {self.buffer!r}"
        self.buffer += chunk

    def response(self, has_body: bool = True) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice in {head!r}"
            headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0")) if has_body else 0
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        try:
            return self.buffer == b"" and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def test_pipelined_predictions_are_answered_in_order(srv: Server) -> None:
    with connect(srv) as sock:
        sock.sendall(b"".join(post("/predictions/echo", b"first-%d" % i) for i in range(5)) + b"GET /ping HTTP/1.1\r\n\r\n")
        reader = Reader(sock)
        answers = [reader.response() for _ in range(6)]
    assert [(status, body) for status, _, body in answers[:5]] == [(200, b"first-%d" % i) for i in range(5)]
    assert answers[5][0] == 200 and b"Healthy" in answers[5][2]
    assert len({headers["x-request-id"] for _, headers, _ in answers}) == 6


def test_expect_continue_gets_100_before_the_body_is_sent(srv: Server) -> None:
    with connect(srv) as sock:
        sock.sendall(
            b"PUT /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        reader = Reader(sock)
        assert reader.response(has_body=False)[0] == 100
        sock.sendall(b"kitty")
        status, _, body = reader.response()
    assert (status, body) == (200, b"kitty")


def test_http_1_0_prediction_is_answered_then_closed(srv: Server) -> None:
    with connect(srv) as sock:
        sock.sendall(post("/predictions/echo", b"old", version="1.0"))
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert (status, body) == (200, b"old")
        assert headers["connection"] == "close"
        assert reader.closed()


def test_head_prediction_has_no_body_and_keeps_the_connection(srv: Server) -> None:
    with connect(srv) as sock:
        sock.sendall(b"HEAD /predictions/echo HTTP/1.1\r\nHost: x\r\n\r\n" + post("/predictions/echo", b"after"))
        reader = Reader(sock)
        status, headers, _ = reader.response(has_body=False)
        assert status == 200 and "content-length" in headers
        assert reader.response()[::2] == (200, b"after")


def test_refused_prediction_keeps_the_connection_usable(srv: Server) -> None:
    with connect(srv) as sock:
        sock.sendall(post("/predictions/nope", b"x") + post("/predictions/echo", b"next"))
        reader = Reader(sock)
        assert reader.response()[0] == 404
        assert reader.response()[::2] == (200, b"next")


def test_handler_header_with_a_line_break_is_a_500_not_a_forged_header(srv: Server) -> None:
    response = srv.predict("types", headers={"X-Set-Header": r"X-Note=a\r\nX-Forged: yes"})
    assert response.status_code == 500
    assert response.json()["message"] == "The handler set an invalid response header: 'x-note'"
    assert "x-forged" not in response.headers and "x-note" not in response.headers


def test_handler_reason_phrase_with_a_line_break_is_a_500_not_a_forged_header(srv: Server) -> None:
    response = srv.predict("types", headers={"X-Set-Status": r"200 Fine\r\nX-Forged: yes"})
    assert response.status_code == 500
    assert response.json()["message"] == r"The handler set an invalid reason phrase: 'Fine\r\nX-Forged: yes'"
    assert "x-forged" not in response.headers


def test_handler_cannot_set_the_response_framing(srv: Server) -> None:
    response = srv.predict("types", headers={"X-Set-Header": "Content-Length=1"})
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content) > 1
    assert response.json()["request_id"] == response.headers["x-request-id"]


def started(srv: Server) -> list[str]:
    path = srv.tmp / "fault_started.log"
    return path.read_text().split("\n") if path.exists() else []


def test_request_whose_client_left_while_queued_never_reaches_the_handler(srv: Server) -> None:
    def in_flight() -> int:
        return int(srv.http.get(f"{srv.management}/models/slow").json()[0]["workers"][0]["batchesInFlight"])

    with ThreadPoolExecutor(2) as pool:
        holding = pool.submit(srv.predict, "slow", b"1.5 hold")
        wait_for(lambda: "1.5 hold" in started(srv), what="the first request to reach the worker")
        # The worker holds the next batch (maxBatchesInFlight 2): the abandoned one waits in the queue.
        held = pool.submit(srv.predict, "slow", b"0 held")
        wait_for(lambda: in_flight() == 2, what="a batch held in the worker")
        with connect(srv) as sock:
            sock.sendall(post("/predictions/slow", b"0 abandoned"))
            time.sleep(0.3)  # long enough to be queued behind the first two
        assert holding.result().status_code == 200
        assert held.result().status_code == 200
    after = srv.predict("slow", b"0 after")
    assert after.status_code == 200
    assert "0 abandoned" not in started(srv)
    assert "0 after" in started(srv)
    # Recorded as a client that went away, not as an answer (the foreground server logs to stdout).
    wait_for(lambda: '"POST /predictions/slow" 499' in srv.log.read_text(), what="the 499 in the access log")


def test_request_whose_client_left_mid_body_is_never_queued(srv: Server) -> None:
    with connect(srv) as sock:
        sock.sendall(post("/predictions/slow", b"0 half-sent")[:-4])
        time.sleep(0.2)
    assert srv.predict("slow", b"0 later").status_code == 200
    assert "0 half-sent"[:-4] not in "\n".join(started(srv))
