"""Streamed answers through a real server: TorchServe's intermediate responses and the generator
API, their framings (chunks, server-sent events, ndjson), and what goes wrong mid-stream."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import Model, Server, ServerFactory, wait_for


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    models = [
        Model("words", "stream_handler.py", batch_size=2, max_batch_delay=300),
        Model("tsstream", "ts_stream_handler.py"),
        Model("gaps", "stream_handler.py", response_timeout=1),
    ]
    return start_module_server("max_response_size=200000\n", models, name="streaming")


def progress(srv: Server) -> list[str]:
    path = srv.tmp / "stream_progress.log"
    return path.read_text().splitlines() if path.exists() else []


def test_a_generator_streams_each_word_as_it_is_made(srv: Server) -> None:
    started = time.monotonic()
    arrivals = []
    with srv.http.stream("POST", f"{srv.inference}/predictions/words", content=b"words 5 every 0.2") as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic() - started, chunk))
    assert b"".join(chunk for _, chunk in arrivals) == b"w0 w1 w2 w3 w4 "
    # The first word arrived well before the last was made (5 words, 0.2 s apart).
    assert arrivals[0][0] < arrivals[-1][0] - 0.5


def test_server_sent_events_when_the_client_asks_for_them(srv: Server) -> None:
    response = srv.http.post(
        f"{srv.inference}/predictions/words", content=b"words 3", headers={"Accept": "text/event-stream"}
    )
    assert response.headers["content-type"] == "text/event-stream"
    assert response.text == "data: w0 \n\ndata: w1 \n\ndata: w2 \n\n"


def test_ndjson_when_the_client_asks_for_it(srv: Server) -> None:
    response = srv.http.post(
        f"{srv.inference}/predictions/words", content=b"words 3 json", headers={"Accept": "application/x-ndjson"}
    )
    assert response.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in response.text.splitlines()] == [
        {"word": "w0", "index": 0}, {"word": "w1", "index": 1}, {"word": "w2", "index": 2}
    ]  # fmt: skip


def test_torchserve_intermediate_responses_then_the_final_output(srv: Server) -> None:
    with srv.http.stream("POST", f"{srv.inference}/predictions/tsstream", content=b"3") as response:
        assert response.headers["ts_stream_next"] == "true"
        chunks = [bytes(chunk) for chunk in response.iter_raw()]
    assert b"".join(chunks) == b"piece 0;piece 1;piece 2;final."
    assert len(chunks) >= 2
    # The same handler answers a request it does not stream in one piece.
    whole = srv.http.post(f"{srv.inference}/predictions/tsstream", content=b"x")
    assert (whole.text, whole.headers.get("transfer-encoding"), "ts_stream_next" in whole.headers) == ("whole x", None, False)


def test_a_batch_with_a_stream_and_a_plain_request(srv: Server) -> None:
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(srv.predict, "words", b"words 4 every 0.05")
        time.sleep(0.05)
        plain = pool.submit(srv.predict, "words", b"plain")
        assert streamed.result().content == b"w0 w1 w2 w3 "
        assert plain.result().content == b"PLAIN"
    assert "transfer-encoding" not in plain.result().headers


def stopped_after(srv: Server, start: int) -> list[str]:
    """The progress lines since ``start``, once a stream begun since then has stopped."""
    lines = progress(srv)[start:]
    return lines if any(line.endswith(" closed") for line in lines) else []


def test_a_client_that_leaves_stops_its_stream_and_not_the_worker(srv: Server) -> None:
    start = len(progress(srv))
    with socket.create_connection(("127.0.0.1", srv.ports[0]), timeout=10) as sock:
        body = b"words 1000 every 0.02"
        sock.sendall(b"POST /predictions/words HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while b"w3 " not in data:
            data += sock.recv(65536)
    lines = wait_for(lambda: stopped_after(srv, start), what="the stream to stop")
    assert isinstance(lines, list)
    # The stream stopped in the worker long before its 1000 words: the handler saw
    # context.cancelled, or the worker closed its generator between two words first.
    assert sum(" word " in line for line in lines) < 1000
    # The worker was not held: it answers the next request at once.
    assert srv.predict("words", b"next").content == b"NEXT"


def test_a_slow_reader_has_its_stream_cut_and_holds_nothing(srv: Server) -> None:
    start = len(progress(srv))
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.settimeout(10)
    reader.connect(("127.0.0.1", srv.ports[0]))
    # 20,000 words of a kilobyte, as fast as the handler makes them, to a client that reads
    # nothing: once the kernel's socket buffers are full and 200,000 bytes (max_response_size) wait
    # in the server, the stream is cut.
    body = b"words 20000 pad 1000"
    reader.sendall(b"POST /predictions/words HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    lines = wait_for(lambda: stopped_after(srv, start), what="the stream to be cut")
    assert isinstance(lines, list)
    assert sum(" word " in line for line in lines) < 20000
    assert srv.predict("words", b"after").content == b"AFTER"
    reader.close()


def test_a_worker_that_dies_mid_stream_ends_it_without_its_last_chunk(srv: Server) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        with srv.http.stream("POST", f"{srv.inference}/predictions/words", content=b"words 10 die_after 3") as response:
            assert response.status_code == 200
            for _ in response.iter_raw():
                pass
    # The worker is replaced and serves again.
    wait_for(lambda: srv.predict("words", b"back").status_code == 200, what="the restarted worker")


def test_response_timeout_bounds_each_gap_not_the_whole_stream(srv: Server) -> None:
    # 6 words 0.4 s apart: 2.4 s in all, under a response_timeout of 1 s.
    response = srv.predict("gaps", b"words 6 every 0.4")
    assert (response.status_code, response.content) == (200, b"w0 w1 w2 w3 w4 w5 ")
    # A gap of 2 s does not pass.
    with pytest.raises(httpx.RemoteProtocolError):
        with srv.http.stream("POST", f"{srv.inference}/predictions/gaps", content=b"words 3 every 2") as stream:
            for _ in stream.iter_raw():
                pass


def test_streams_are_counted(srv: Server) -> None:
    def value(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and 'model_name="words"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = srv.http.get(f"{srv.metrics}/metrics").text
    assert srv.predict("words", b"words 7").content == b"w0 w1 w2 w3 w4 w5 w6 "
    after = srv.http.get(f"{srv.metrics}/metrics").text
    assert value(after, "marserve_stream_pieces_total") - value(before, "marserve_stream_pieces_total") == 7
    count = "marserve_time_to_first_byte_seconds_count"
    assert value(after, count) - value(before, count) == 1
