"""Frames between the frontend and a worker, through real sockets in both directions."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from server.workers import frames as protocol
from server.workers.messages import Load, Loaded, Predict, Request, Response, Result
from server.workers.process import WorkerChannel

META: dict[str, Any] = {"requests": [{"id": "r1", "headers": [["x-a", "é"]], "params": [["body", None, 3]]}]}


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def send_in_background(sock: socket.socket, buffers: Sequence[protocol.Buffer]) -> threading.Thread:
    # A frame bigger than the socket buffer blocks its writer until the reader drains it.
    thread = threading.Thread(target=protocol.send_frame, args=(sock, buffers))
    thread.start()
    return thread


def roundtrip(
    pair: tuple[socket.socket, socket.socket], kind: int, meta: dict[str, Any], parts: Sequence[bytes]
) -> Any:
    writer = send_in_background(pair[0], protocol.encode(kind, meta, parts))
    frame = protocol.recv_frame(pair[1])
    writer.join(10)
    return frame


@pytest.mark.parametrize(
    "parts",
    [
        [],
        [b""],
        [b"", b"abc", b""],
        [b"abc"],
        [os.urandom(65535)],  # one byte under the size where parts go out separately
        [os.urandom(1 << 16)],
        [os.urandom(5_000_000), b"", os.urandom(70_000), b"tail"],
    ],
    ids=["none", "one-empty", "empties-around", "small", "just-under-64k", "64k", "big-mixed"],
)
def test_roundtrip_blocking(pair: tuple[socket.socket, socket.socket], parts: list[bytes]) -> None:
    kind, meta, blob = roundtrip(pair, protocol.PREDICT, META, parts)
    assert kind == protocol.PREDICT
    assert meta == META
    assert [bytes(p) for p in protocol.split(blob, [len(p) for p in parts])] == parts
    assert len(blob) == sum(len(p) for p in parts)


def test_small_frames_are_one_buffer_and_big_ones_are_not_copied() -> None:
    assert len(protocol.encode(protocol.RESULT, {"a": 1}, [b"x", b"y"])) == 1
    big = os.urandom(1 << 17)
    buffers = protocol.encode(protocol.RESULT, {"a": 1}, [big, b"z"])
    assert len(buffers) == 3
    assert buffers[1] is big


def test_encode_accepts_bytearray_and_memoryview(pair: tuple[socket.socket, socket.socket]) -> None:
    parts = [bytearray(b"ab"), memoryview(b"cdef")[1:3], b"g"]
    writer = send_in_background(pair[0], protocol.encode(protocol.RESULT, {}, parts))
    _, _, blob = protocol.recv_frame(pair[1])  # type: ignore[misc]
    writer.join(10)
    assert bytes(blob) == b"abdeg"


def test_several_frames_in_a_row(pair: tuple[socket.socket, socket.socket]) -> None:
    frames = [(protocol.LOAD, {"n": i}, [os.urandom(i * 40_000)]) for i in range(4)]
    writer = threading.Thread(
        target=lambda: [protocol.send_frame(pair[0], protocol.encode(k, m, p)) for k, m, p in frames]
    )
    writer.start()
    for kind, meta, parts in frames:
        got_kind, got_meta, blob = protocol.recv_frame(pair[1])  # type: ignore[misc]
        assert (got_kind, got_meta, bytes(blob)) == (kind, meta, parts[0])
    writer.join(10)


def test_recv_frame_is_none_when_peer_closes(pair: tuple[socket.socket, socket.socket]) -> None:
    pair[0].close()
    assert protocol.recv_frame(pair[1]) is None


def test_recv_frame_is_none_when_peer_closes_mid_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    buffers = protocol.encode(protocol.RESULT, {"a": 1}, [b"0123456789"])
    pair[0].sendall(bytes(buffers[0])[:-4])
    pair[0].close()
    assert protocol.recv_frame(pair[1]) is None


def test_meta_json_cannot_express_still_travels() -> None:
    # orjson refuses lone surrogates and integers past 64 bits; the frame falls back to plain JSON.
    meta = {"header": "bad \ud800 surrogate", "count": 2**70, "text": "é"}
    kind, got, blob = protocol.decode(b"".join(protocol.encode(protocol.RESULT, meta, [b"x"])))
    assert (kind, got, bytes(blob)) == (protocol.RESULT, meta, b"x")


def serve_echo_frames(sock: socket.socket) -> threading.Thread:
    """A stand-in worker on a blocking socket: answers each frame with a RESULT carrying its blob back."""

    def run() -> None:
        while (frame := protocol.recv_frame(sock)) is not None:
            _, meta, blob = frame
            protocol.send_frame(sock, protocol.encode(protocol.RESULT, {"seen": meta}, [blob]))
        sock.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_worker_channel_exchanges_frames_then_reports_the_peer_gone(pair: tuple[socket.socket, socket.socket]) -> None:
    parts = [os.urandom(3_000_000), b"", b"end"]
    worker = serve_echo_frames(pair[1])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(WorkerChannel, sock=pair[0])
        for size in (0, 10, 70_000):
            kind, meta, blob = await channel.exchange(protocol.encode(protocol.PREDICT, META, [b"y" * size]))
            assert (kind, meta, bytes(blob)) == (protocol.RESULT, {"seen": META}, b"y" * size)
        kind, meta, blob = await channel.exchange(protocol.encode(protocol.PREDICT, {"big": 1}, parts))
        assert [bytes(p) for p in protocol.split(blob, [len(p) for p in parts])] == parts
        pair[1].shutdown(socket.SHUT_RDWR)  # the worker goes away
        with pytest.raises(ConnectionError):
            await channel.exchange(protocol.encode(protocol.PREDICT, META, [b"z"]))
        with pytest.raises(ConnectionError):
            await channel.exchange(protocol.encode(protocol.PREDICT, META, [b"z"]))
        channel.close()

    asyncio.run(main())
    worker.join(10)


def test_worker_channel_drops_a_worker_that_talks_out_of_turn(pair: tuple[socket.socket, socket.socket]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(WorkerChannel, sock=pair[0])
        protocol.send_frame(pair[1], protocol.encode(protocol.RESULT, {"unasked": True}))
        await asyncio.sleep(0.2)
        with pytest.raises(ConnectionError):
            await channel.exchange(protocol.encode(protocol.PREDICT, META, [b"z"]))

    asyncio.run(main())


def test_split_gives_views_of_the_given_sizes() -> None:
    blob = memoryview(b"aabbbc")
    parts = protocol.split(blob, [2, 0, 3, 1])
    assert [bytes(p) for p in parts] == [b"aa", b"", b"bbb", b"c"]
    assert all(isinstance(p, memoryview) for p in parts)
    assert protocol.split(memoryview(b""), []) == []


# -- the messages in the frames ------------------------------------------------------------------


LOAD = Load(
    model_name="m", model_dir="/models/m", handler="h.py:handle", batch_size=4, gpu_id=1,
    manifest={"model": {"modelName": "m"}}, model_yaml_config={"minWorkers": 1}, limit_max_image_pixels=False,
    decode_input_request=True, max_response_size=100, server_version="0.12.0",
)  # fmt: skip


def through_a_frame(kind: int, message: object, parts: Sequence[bytes] = ()) -> tuple[dict[str, Any], bytes]:
    got_kind, meta, blob = protocol.decode(b"".join(protocol.encode(kind, message, parts)))
    assert got_kind == kind
    return meta, bytes(blob)


def test_each_message_is_rebuilt_from_its_frame() -> None:
    assert Load.from_meta(through_a_frame(protocol.LOAD, LOAD)[0]) == LOAD
    loaded = Loaded(507, "System out of memory", None)
    assert Loaded.from_meta(through_a_frame(protocol.LOADED, loaded)[0]) == loaded
    predict = Predict([Request("r1", [["x-a", "é"]], [["body", None, 3], ["extra", "text/plain", 0]])])  # type: ignore[list-item]
    meta, blob = through_a_frame(protocol.PREDICT, predict, [b"abc", b""])
    assert Predict.from_meta(meta) == predict and blob == b"abc"
    result = Result(
        200, "", [Response(201, "Created", "application/json", [["x-b", "1"]], 2)], 1.5, 1.0,  # type: ignore[list-item]
        [{"name": "Seen", "value": 1.0, "dimensions": [["Level", "Model"]]}],
    )  # fmt: skip
    meta, blob = through_a_frame(protocol.RESULT, result, [b"{}"])
    assert Result.from_meta(meta) == result and blob == b"{}"


def test_the_load_message_carries_the_server_version() -> None:
    meta, _ = through_a_frame(protocol.LOAD, LOAD)
    assert meta["server_version"] == "0.12.0"
    with pytest.raises(TypeError):
        Load.from_meta({k: v for k, v in meta.items() if k != "server_version"})


def test_a_message_orjson_refuses_still_travels() -> None:
    # A handler's header with a lone surrogate, a metric past 64 bits: the frame falls back to JSON.
    result = Result(
        200, "", [Response(200, "", None, [("x-bad", "bad \ud800 surrogate")], 1)], 1.0, None,
        [{"name": "Big", "value": 2**70}],
    )  # fmt: skip
    meta, blob = through_a_frame(protocol.RESULT, result, [b"x"])
    got = Result.from_meta(meta)
    assert [list(header) for header in got.responses[0].headers] == [["x-bad", "bad \ud800 surrogate"]]
    assert got.metrics == [{"name": "Big", "value": 2**70}] and blob == b"x"


def test_something_that_is_no_message_is_refused() -> None:
    with pytest.raises(TypeError):
        protocol.encode(protocol.RESULT, {"value": object()})
