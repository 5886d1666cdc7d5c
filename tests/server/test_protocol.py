"""Frames between the frontend and a worker, through real sockets in both directions."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from server import protocol

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


def test_asyncio_reader_roundtrip_and_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    parts = [os.urandom(3_000_000), b"", b"end"]

    async def main() -> None:
        reader, writer = await asyncio.open_unix_connection(sock=pair[1])
        sender = send_in_background(pair[0], protocol.encode(protocol.RESULT, {"code": 200}, parts))
        kind, meta, blob = await protocol.read_frame(reader)
        assert (kind, meta) == (protocol.RESULT, {"code": 200})
        assert [bytes(p) for p in protocol.split(blob, [len(p) for p in parts])] == parts
        await asyncio.to_thread(sender.join, 10)
        pair[0].close()
        with pytest.raises(asyncio.IncompleteReadError):
            await protocol.read_frame(reader)
        writer.close()

    asyncio.run(main())


def test_asyncio_writer_to_blocking_reader(pair: tuple[socket.socket, socket.socket]) -> None:
    # The frontend writes with asyncio streams, the worker reads with blocking sockets.
    parts = [os.urandom(200_000), b"x"]
    received: list[Any] = []
    reader_thread = threading.Thread(target=lambda: received.append(protocol.recv_frame(pair[1])))
    reader_thread.start()

    async def main() -> None:
        _, writer = await asyncio.open_unix_connection(sock=pair[0])
        writer.writelines(protocol.encode(protocol.PREDICT, META, parts))
        await writer.drain()
        await asyncio.to_thread(reader_thread.join, 10)
        writer.close()

    asyncio.run(main())
    kind, meta, blob = received[0]
    assert (kind, meta, bytes(blob)) == (protocol.PREDICT, META, b"".join(parts))


def test_split_gives_views_of_the_given_sizes() -> None:
    blob = memoryview(b"aabbbc")
    parts = protocol.split(blob, [2, 0, 3, 1])
    assert [bytes(p) for p in parts] == [b"aa", b"", b"bbb", b"c"]
    assert all(isinstance(p, memoryview) for p in parts)
    assert protocol.split(memoryview(b""), []) == []
