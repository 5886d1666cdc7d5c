"""Frames exchanged between the frontend and a worker over their private socket.

A frame is a fixed header, a small JSON ``meta`` object and a blob of raw bytes:

    kind: 1 byte | meta length: u32 | blob length: u32 | meta (UTF-8 JSON) | blob

Payloads (request bodies, handler outputs) travel only in the blob, byte for byte: they are
never base64-encoded or re-encoded as JSON. ``meta`` is one of the ``messages`` dataclasses and
says how the blob splits into parts.
Both directions use plain JSON rather than pickle, so neither side can make the other run code.
The JSON is orjson's: on this path the standard library's encoder and decoder cost more than
everything else a small request needs, together.

This module must stay importable without torch: the frontend uses it.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

import orjson

HEADER = struct.Struct("!BII")

LOAD = ord("L")  # frontend -> worker: what to load
LOADED = ord("l")  # worker -> frontend: load outcome
PREDICT = ord("P")  # frontend -> worker: one batch
RESULT = ord("R")  # worker -> frontend: the batch's responses
PIECE = ord("S")  # worker -> frontend: one piece of a streamed response, before the RESULT
CANCEL = ord("C")  # frontend -> worker: nobody reads these requests' streams any more

Buffer = bytes | bytearray | memoryview

# Small frames are joined into one write; big ones go out part by part to avoid a copy.
_JOIN_BELOW = 1 << 16


def encode(kind: int, meta: object, parts: Sequence[Buffer] = ()) -> list[Buffer]:
    """The buffers of one frame, ready for ``writelines`` or ``send_frame``; ``meta`` is a message
    dataclass (or a plain dict)."""
    try:
        meta_bytes = orjson.dumps(meta)
    except orjson.JSONEncodeError:
        # What orjson refuses and JSON can still say: lone surrogates a handler put in a header,
        # integers past 64 bits in its metrics.
        meta_bytes = json.dumps(meta, separators=(",", ":"), default=_fields).encode()
    blob_len = sum(len(part) for part in parts)
    head = HEADER.pack(kind, len(meta_bytes), blob_len)
    if blob_len < _JOIN_BELOW:
        return [b"".join((head, meta_bytes, *parts))]
    return [head + meta_bytes, *parts]


def _fields(value: object) -> dict[str, Any]:
    """A message dataclass as the dict orjson would have written (only on the rare fallback)."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        raise TypeError(f"{type(value).__name__} is not JSON serializable")
    return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}


def frame_size(buffer: Buffer) -> int | None:
    """The size of the frame that starts ``buffer``, once its header is there."""
    if len(buffer) < HEADER.size:
        return None
    _, meta_len, blob_len = HEADER.unpack_from(buffer)
    return int(HEADER.size + meta_len + blob_len)


def decode(frame: Buffer) -> tuple[int, dict[str, Any], memoryview]:
    """``(kind, meta, blob)`` of one whole frame; the blob is a view into ``frame``, not a copy."""
    kind, meta_len, _ = HEADER.unpack_from(frame)
    view = memoryview(frame)[HEADER.size :]
    try:
        meta = orjson.loads(view[:meta_len])
    except orjson.JSONDecodeError:
        meta = json.loads(view[:meta_len].tobytes())  # what encode's fallback wrote
    return kind, meta, view[meta_len:]


def recv_frame(sock: socket.socket) -> tuple[int, dict[str, Any], memoryview] | None:
    """Blocking read of one frame; None when the peer closed the connection."""
    head = bytearray(HEADER.size)
    if not _recv_into(sock, memoryview(head)):
        return None
    frame = bytearray(frame_size(head) or 0)
    frame[: HEADER.size] = head
    if not _recv_into(sock, memoryview(frame)[HEADER.size :]):
        return None
    return decode(frame)


def _recv_into(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from the socket; False if the peer closes first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def send_frame(sock: socket.socket, buffers: Sequence[Buffer]) -> None:
    for buffer in buffers:
        sock.sendall(buffer)


def split(blob: memoryview, sizes: Sequence[int]) -> list[memoryview]:
    """Cut ``blob`` into consecutive parts of the given sizes (views, no copies)."""
    parts: list[memoryview] = []
    offset = 0
    for size in sizes:
        parts.append(blob[offset : offset + size])
        offset += size
    return parts
