"""What a route answers, and the bytes of a response head.

A route returns anything with a status, a reason phrase, a content type, headers and a body
(``Answer``): a ``Response`` it built, or a worker's ``Reply`` as it arrived. The connection writes
it with the policy's own headers in one send (``head``).
"""

from __future__ import annotations

import http
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ServerError


class Head(Protocol):
    """What a response's head is made of."""

    @property
    def status(self) -> int: ...
    @property
    def phrase(self) -> str: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, str]]: ...


class Answer(Head, Protocol):
    """A response as a route hands it to the connection."""

    @property
    def body(self) -> bytes: ...


class PieceSink(Protocol):
    """Where a streamed answer's pieces go: the connection writes each as it comes."""

    def piece(self, data: bytes) -> None: ...

    def end(self, error: str | None = None) -> None:
        """The stream is complete, or broke (``error``: why, for the log)."""


class Streamed(Head, Protocol):
    """An answer whose body comes in pieces (a generative model's tokens, say): the status and
    headers go out with the first piece, then each piece as it is produced."""

    def attach(self, sink: PieceSink) -> None:
        """Start sending pieces to ``sink``: those produced so far at once, then the rest."""

    def cancel(self) -> None:
        """Nobody will read the rest (the client left, or reads too slowly): stop producing."""


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: Sequence[tuple[str, str]] = ()
    phrase: str = ""


#: Renders an error in the dialect of the routes it happened on (TorchServe's JSON, OIP's ...).
ErrorRenderer = Callable[[ServerError], Answer]


def json_body(payload: Any) -> bytes:
    """TorchServe's JSON: 2-space indent, non-ASCII as is, a trailing newline."""
    return (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode()


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(status, json_body(payload), "application/json")


def status_response(message: str, status: int = 200) -> Response:
    return json_response({"status": message}, status)


def torchserve_error(error: ServerError) -> Response:
    """``{"code", "type", "message"}``, as TorchServe answers every error on its REST routes."""
    return Response(error.status_code, json_body(error.to_dict()), "application/json")


# TorchServe sends these on every response; clients and proxies must not cache predictions.
NO_CACHE = (
    ("cache-control", "no-cache; no-store, must-revalidate, private"),
    ("pragma", "no-cache"),
    ("expires", "Thu, 01 Jan 1970 00:00:00 UTC"),
)
# Framing is the connection's to set: a handler's own copies would let its output forge a response.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def header_line(name: str, value: str) -> bytes:
    """``name: value`` as a head line; ValueError naming the header if it is not valid HTTP."""
    if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
        raise ValueError(f"response header: {name!r}")
    try:
        return f"{name}: {value}\r\n".encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"response header: {name!r}") from None


def header_lines(headers: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(header_line(name, value) for name, value in headers)


_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int, phrase: str = "") -> bytes:
    """The first line, with the route's reason phrase if it set one (a handler may, as in
    TorchServe), else the standard one; ValueError if the phrase is not valid HTTP."""
    if phrase:
        if _BAD_VALUE.search(phrase):
            raise ValueError(f"reason phrase: {phrase!r}")
        try:
            return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("latin-1"))
        except UnicodeEncodeError:
            raise ValueError(f"reason phrase: {phrase!r}") from None
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            standard = http.HTTPStatus(status).phrase
        except ValueError:
            standard = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {standard}\r\n".encode()
    return line


def head(answer: Head, own: Sequence[tuple[str, str]], own_lines: bytes, request_id: str) -> bytes:
    """The status line and headers of ``answer``: the server's own headers (``own``, rendered as
    ``own_lines``), the request id, and the answer's, minus framing. ValueError if the route set
    something that is not HTTP.

    An answer's header replaces the server's of the same name (a handler's Cache-Control, say),
    never the request id. The common answer sets none and costs one concatenation.
    """
    first = status_line(answer.status, answer.phrase)
    content_type = answer.content_type
    if not answer.headers:
        lines = first + own_lines + b"x-request-id: %s\r\n" % request_id.encode()
        return lines + header_line("content-type", content_type) if content_type else lines
    merged = dict(own)
    for name, value in answer.headers:
        merged[name.lower()] = value
    merged["x-request-id"] = request_id
    if content_type:
        # Sent as the route set it (TorchServe adds no charset either).
        merged["content-type"] = content_type
    return first + b"".join(header_line(name, value) for name, value in merged.items() if name not in _FRAMING)
