"""Frames exchanged between the frontend and a worker over their private socket.

A frame is a fixed header, a small JSON ``meta`` object and a blob of raw bytes:

    kind: 1 byte | meta length: u32 | blob length: u32 | meta (UTF-8 JSON) | blob

Payloads (request bodies, handler outputs) travel only in the blob, byte for byte: they are
never base64-encoded or re-encoded as JSON. ``meta`` says how the blob splits into parts.
Both directions use plain JSON rather than pickle, so neither side can make the other run code.

This module must stay importable without torch: the frontend uses it.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only for hints: importing asyncio would add ~50 ms to every worker's start.
    import asyncio

HEADER = struct.Struct("!BII")

LOAD = ord("L")  # frontend -> worker: what to load
LOADED = ord("l")  # worker -> frontend: load outcome
PREDICT = ord("P")  # frontend -> worker: one batch
RESULT = ord("R")  # worker -> frontend: the batch's responses

Buffer = bytes | bytearray | memoryview

# Small frames are joined into one write; big ones go out part by part to avoid a copy.
_JOIN_BELOW = 1 << 16


def encode(kind: int, meta: dict[str, Any], parts: Sequence[Buffer] = ()) -> list[Buffer]:
    """The buffers of one frame, ready for ``writelines`` or ``send_frame``."""
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    blob_len = sum(len(part) for part in parts)
    head = HEADER.pack(kind, len(meta_bytes), blob_len)
    if blob_len < _JOIN_BELOW:
        return [b"".join((head, meta_bytes, *parts))]
    return [head + meta_bytes, *parts]


def _decode(head: bytes, body: Buffer) -> tuple[int, dict[str, Any], memoryview]:
    kind, meta_len, _ = HEADER.unpack(head)
    view = memoryview(body)
    return kind, json.loads(view[:meta_len].tobytes()), view[meta_len:]


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any], memoryview]:
    """Read one frame; raises ``asyncio.IncompleteReadError`` if the peer has gone."""
    head = await reader.readexactly(HEADER.size)
    _, meta_len, blob_len = HEADER.unpack(head)
    return _decode(head, await reader.readexactly(meta_len + blob_len))


def recv_frame(sock: socket.socket) -> tuple[int, dict[str, Any], memoryview] | None:
    """Blocking read of one frame; None when the peer closed the connection."""
    head = _recv_exactly(sock, HEADER.size)
    if head is None:
        return None
    _, meta_len, blob_len = HEADER.unpack(head)
    body = _recv_exactly(sock, meta_len + blob_len)
    if body is None:
        return None
    return _decode(bytes(head), body)


def _recv_exactly(sock: socket.socket, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return buf


def send_frame(sock: socket.socket, buffers: Sequence[Buffer]) -> None:
    for buffer in buffers:
        sock.sendall(buffer)


def split(blob: memoryview, sizes: Sequence[int]) -> list[memoryview]:
    """Cut ``blob`` into consecutive parts of the given sizes (views, no copies)."""
    parts = []
    offset = 0
    for size in sizes:
        parts.append(blob[offset : offset + size])
        offset += size
    return parts
