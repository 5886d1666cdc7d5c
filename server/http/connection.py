"""One HTTP/1.1 client connection, parsed by httptools: the front door of every port.

A request goes through the same steps whatever its route:

1. its head is parsed and capped (``MAX_HEAD_BYTES``, ``MAX_HEADERS``); anything that is not
   HTTP is answered with TorchServe's JSON 400 and the connection closes;
2. the listener's router names its route, and the policy (``policy.RequestPolicy``) gives it a
   request id and refuses it on its head alone (413, 401), or the route refuses it (404, 405);
3. its body is collected up to ``max_request_size``, or dropped if the route reads none;
4. the route's handler answers it: at once, with a future (a queued inference job: no task is
   started for it), or with a coroutine, run as a task;
5. the answer is written in one send, with the policy's headers; the policy counts it and
   writes its access-log line.

Pipelined requests are answered in order, one at a time; the connection stops reading while
one waits its turn, and stops starting new ones while the client does not read its answers.

Clients that trickle or stall cannot hold a connection for long: a connection that owes the rest
of a request and stays silent for ``read_timeout`` seconds is closed; a request head must be
complete ``head_timeout`` seconds after it began (after the connection opened, for its first
request); a body must then arrive at ``min_body_rate`` bytes a second on average, after a grace of
``head_timeout`` seconds; a connection idle between requests is closed after ``keep_alive``
seconds. A listener holds at most ``max_connections``: a new one past the cap closes the oldest
connection that has not sent a whole request head or is idle, and is refused if there is none.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httptools

from ..errors import BadRequest, ServerError
from .policy import RequestPolicy
from .request import Request
from .responses import Answer, Response, Streamed, head, torchserve_error
from .routing import Route, Router

log = logging.getLogger("marserve.http")

# The request line and headers together; cookies and tokens fit with room to spare.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
KEEP_ALIVE_SECONDS = 5.0
INVALID = "Invalid HTTP message."
HEAD_TOO_LARGE = f"Invalid HTTP message: the request line and headers exceed {MAX_HEAD_BYTES} bytes"
TOO_MANY_HEADERS = f"Invalid HTTP message: more than {MAX_HEADERS} header fields"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# What the refusal counter calls each reason to refuse a message.
_REASONS = {INVALID: "invalid", HEAD_TOO_LARGE: "head_too_large", TOO_MANY_HEADERS: "too_many_headers"}


@dataclass(eq=False)
class Door:
    """What one listener's connections share: its routes, the policy, its timeouts and caps."""

    router: Router
    policy: RequestPolicy
    read_timeout: float
    head_timeout: float
    min_body_rate: int  # bytes a second; 0: no minimum
    max_connections: int
    #: Bytes of a streamed answer that may wait for a slow reader; past them the stream is cut.
    stream_buffer: int = 6553500
    keep_alive: float = KEEP_ALIVE_SECONDS
    #: Open connections, oldest first (a dict keeps the order a set would not).
    connections: dict[HttpConnection, None] = field(default_factory=dict)
    #: Set when the server stops: answers say ``connection: close``.
    closing: bool = False
    #: The most connections open at once since memory was last given back.
    peak: int = 0

    def admit(self, connection: HttpConnection) -> bool:
        """Whether a new connection may stay; at the cap, the oldest evictable one makes room."""
        if len(self.connections) >= self.max_connections:
            oldest = next((c for c in self.connections if c.evictable()), None)
            if oldest is None:
                return False
            oldest.close("evicted")
        self.connections[connection] = None
        self.peak = max(self.peak, len(self.connections))
        return True

    def release(self, connection: HttpConnection) -> None:
        self.connections.pop(connection, None)
        if self.peak >= _TRIM_AFTER and len(self.connections) <= self.peak // 8:
            # Thousands of connections came and went (a flood, an attack): the allocator keeps the
            # pages they used unless asked to give them back.
            self.peak = len(self.connections)
            give_back_memory()


class _StreamWriter:
    """Writes one streamed answer's pieces to its connection (the ``PieceSink`` it attaches to)."""

    __slots__ = ("connection", "exchange", "answer", "chunked", "done")

    def __init__(self, connection: HttpConnection, exchange: _Exchange, answer: Streamed, chunked: bool) -> None:
        self.connection = connection
        self.exchange = exchange
        self.answer = answer
        self.chunked = chunked
        self.done = False

    def piece(self, data: bytes) -> None:
        transport = self.connection.transport
        if self.done or not data or transport is None or transport.is_closing():
            return
        transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        if transport.get_write_buffer_size() > self.connection.door.stream_buffer:
            # The client reads slower than the answer is made: rather than hold all of it, the
            # stream is cut, and its producer told to stop.
            log.warning(
                "streamed answer to %s cut: more than %d bytes waited for the client to read them",
                self.connection.client, self.connection.door.stream_buffer,
            )  # fmt: skip
            self.abandon()
            transport.close()

    def end(self, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        connection = self.connection
        transport = connection.transport
        if transport is not None and not transport.is_closing():
            if error is not None:
                # No terminating chunk: the client can tell the stream broke (and a 1.0 client
                # sees the connection close early, which is the most HTTP/1.0 can say).
                log.warning("streamed answer to %s broke: %s", connection.client, error)
                transport.close()
            else:
                if self.chunked:
                    transport.write(b"0\r\n\r\n")
                if connection._closing:
                    transport.close()
        connection._stream_ended(self.exchange, self.answer.status if error is None else 500)

    def abandon(self) -> None:
        """Nobody reads the rest: the producer stops, and the request counts as left (499)."""
        if self.done:
            return
        self.done = True
        self.answer.cancel()
        self.connection._stream_ended(self.exchange, 499)


# Connections at once past which their going away gives memory back to the system.
_TRIM_AFTER = 1000


def give_back_memory() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Refused(Exception):
    """Raised from a parser callback to refuse the message (the reason is ``_refusal``)."""


class _Exchange(Request):
    """One request on this connection, from its head to its answer: the request its route sees,
    and where the connection is with it."""

    __slots__ = (
        "route", "refusal", "chunks", "size", "body_seen", "complete", "started", "answered", "pending", "http10",
        "stream",
    )  # fmt: skip

    def __init__(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        request_id: str,
        keep_alive: bool,
        route: Route,
        path_params: dict[str, str],
    ) -> None:
        super().__init__(method, path, query_string, headers, client, request_id, time.perf_counter(), keep_alive)
        self.path_params = path_params
        self.route = route
        self.refusal: ServerError | None = None  # decided from the head: answered when its turn comes
        self.chunks: list[bytes] = []
        self.size = 0
        self.body_seen = False
        self.complete = False
        self.started = False
        self.answered = False
        self.pending: asyncio.Future[Any] | None = None
        self.http10 = False
        self.stream: _StreamWriter | None = None  # while a streamed answer is being written


class HttpConnection(asyncio.Protocol):
    # Thousands may be open at once (a flood, an attack): slots keep each one small.
    __slots__ = (
        "door", "loop", "parser", "transport", "client", "_url", "_headers", "_head_size", "_in_head",
        "_head_bytes", "_incomplete", "_receiving", "_queue", "_refusal", "_closing", "_advancing",
        "_read_paused", "_write_paused", "_last_read", "_idle_since", "_phase_started", "_body_bytes",
        "_requests", "_timer", "__weakref__",
    )  # fmt: skip

    def __init__(self, door: Door, loop: asyncio.AbstractEventLoop) -> None:
        self.door = door
        self.loop = loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0  # the parsed head's bytes: its URL and header lines
        self._in_head = True
        self._head_bytes = 0  # raw bytes received since the head began
        self._incomplete = True  # the client owes the rest of a request (or its first byte)
        self._receiving: _Exchange | None = None  # the request whose body is arriving
        self._queue: deque[_Exchange] = deque()  # answered in order; [0]'s turn
        self._refusal = INVALID
        self._closing = False
        self._advancing = False
        self._read_paused = False
        self._write_paused = False
        self._last_read = 0.0
        self._idle_since = 0.0
        # When the head being read began (or the connection opened), then when its body began.
        self._phase_started = 0.0
        self._body_bytes = 0
        self._requests = 0
        self._timer: asyncio.TimerHandle | None = None

    # -- the transport ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio's classes
        peer = transport.get_extra_info("peername")
        self.client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass  # not TCP
        self._last_read = self._phase_started = self.loop.time()
        if not self.door.admit(self):
            # Every connection is busy with a request: refused before it costs anything more.
            self.door.policy.refused("connection_cap")
            transport.close()
            return
        self._arm(min(self.door.read_timeout, self.door.head_timeout))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for exchange in list(self._queue):
            self._client_gone(exchange)
        self._queue.clear()
        self._receiving = None
        # The parser calls back into this object and this object holds the parser: a cycle that
        # only a full garbage collection would free, which may not come for a long time after a
        # flood of connections. Nothing is parsed once the connection is lost.
        del self.parser
        self.door.release(self)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Only plain HTTP/1.1 is spoken here: the request is answered as one, and the
            # connection closes after it, since what follows is not HTTP/1.1.
            self._closing = True
            if self._receiving is not None:
                self.on_message_complete()
        except httptools.HttpParserError as exc:
            if isinstance(exc, httptools.HttpParserCallbackError) and not isinstance(exc.__context__, _Refused):
                log.error("error parsing a request from %s", self.client, exc_info=exc.__context__)
            self._refuse(self._refusal)
            return
        # httptools holds an unfinished header line in memory, unseen by the callbacks: a head
        # still unfinished after more bytes than the cap is too large, whatever its shape.
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and self._incomplete:
            self._refuse(HEAD_TOO_LARGE)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._advance()

    def evictable(self) -> bool:
        """Whether closing it costs no request: it is between requests, or has not sent a whole head."""
        return not self._queue and (self._in_head or not self._incomplete)

    def close(self, reason: str) -> None:
        """Close for ``reason`` (a deadline missed, evicted at the cap), counted by the policy."""
        # Out of the count at once: the transport only reports it lost once its buffer is written.
        self.door.connections.pop(self, None)
        if self.transport is not None and not self.transport.is_closing():
            self.door.policy.refused(reason)
            self.transport.close()

    def shutdown(self) -> None:
        """The server is stopping: close now if no request is being answered, else after it."""
        self._closing = True
        if not self._queue and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._in_head = True
        self._incomplete = True
        if self._requests:
            # The first head's clock started when the connection opened.
            self._phase_started = self.loop.time()
        self._requests += 1
        if self._timer is None:
            self._arm(min(self.door.read_timeout, self.door.head_timeout))

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        self._head_size += len(name) + len(value) + 4
        if len(self._headers) > MAX_HEADERS:
            self._refusal = TOO_MANY_HEADERS
            raise _Refused

    def on_headers_complete(self) -> None:
        headers = self._headers
        # A head that arrived in one read is only seen whole here; one read is at most the event
        # loop's read buffer, so what was parsed before this check is bounded too.
        if len(self._url) + self._head_size > MAX_HEAD_BYTES:
            self._refusal = HEAD_TOO_LARGE
            raise _Refused
        self._in_head = False
        self._phase_started = self.loop.time()
        self._body_bytes = 0
        parser = self.parser
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            self._refusal = INVALID
            raise _Refused from None
        path = url.path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        method = parser.get_method().decode("ascii")
        door = self.door
        policy = door.policy
        http10 = parser.get_http_version() == "1.0"
        keep_alive = parser.should_keep_alive() and not http10
        route, params = door.router.match(method, path)
        exchange = _Exchange(method, path, url.query or b"", headers, self.client, policy.request_id(), keep_alive, route, params)
        exchange.http10 = http10
        exchange.refusal = policy.check_head(route.key, headers)
        self._receiving = exchange
        self._queue.append(exchange)
        if len(self._queue) == 1:
            self._advance()
        elif not self._read_paused and self.transport is not None:
            # Pipelined: it waits for the ones before it, and so does whatever follows it.
            self._read_paused = True
            self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        exchange = self._receiving
        if exchange is None:
            return
        exchange.body_seen = True
        if exchange.answered or exchange.refusal is not None or not exchange.route.reads_body:
            return  # read and dropped
        exchange.size += len(body)
        if exchange.size > self.door.policy.limit:
            exchange.chunks = []
            exchange.refusal = self.door.policy.body_too_large()
            if exchange.started:
                self._answer_error(exchange, exchange.refusal)
            return
        exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        self._incomplete = False
        self._in_head = True
        self._head_bytes = 0
        exchange, self._receiving = self._receiving, None
        if exchange is None:
            return
        exchange.complete = True
        if exchange.started and not exchange.answered and exchange.refusal is None and exchange.route.reads_body:
            self._dispatch(exchange)

    # -- answering -------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Start the request whose turn it is, and the next ones while they are answered at once."""
        transport = self.transport
        if self._advancing or transport is None or transport.is_closing():
            return  # the loop below is running further up the stack, or nobody is listening
        self._advancing = True
        try:
            while self._queue and not self._write_paused and not self._queue[0].started:
                self._start(self._queue[0])
                if transport.is_closing():
                    return
        finally:
            self._advancing = False
        if self._read_paused and len(self._queue) <= 1:
            self._read_paused = False
            transport.resume_reading()
        if not self._queue and not self._incomplete:
            self._idle_since = self.loop.time()
            if self._timer is None:
                self._arm(self.door.keep_alive)

    def _start(self, exchange: _Exchange) -> None:
        exchange.started = True
        if exchange.refusal is not None:
            self._answer_error(exchange, exchange.refusal)
        elif exchange.complete or not exchange.route.reads_body:
            self._dispatch(exchange)
        elif exchange.header(b"expect") == b"100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)

    def _dispatch(self, exchange: _Exchange) -> None:
        chunks = exchange.chunks
        if chunks:
            exchange.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            exchange.chunks = []
        try:
            result = exchange.route.handler(exchange)
        except ServerError as error:
            self._answer_error(exchange, error)
            return
        except Exception as exc:  # a bug must still answer, in the route's format
            log.exception("unexpected error serving %s %s", exchange.method, exchange.path)
            self._answer_error(exchange, ServerError(f"{type(exc).__name__}: {exc}"))
            return
        if isinstance(result, asyncio.Future):
            pending: asyncio.Future[Any] = result
        elif asyncio.iscoroutine(result):
            pending = self.loop.create_task(result)
        else:
            self._answer(exchange, result)  # type: ignore[arg-type]
            return
        exchange.pending = pending
        pending.add_done_callback(lambda done: self._on_result(exchange, done))

    def _on_result(self, exchange: _Exchange, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            # Cancelled because the client left (_client_gone): nobody reads this answer.
            if not exchange.answered:
                exchange.answered = True
                self._finished(exchange, 499)
            return
        error = done.exception()
        if error is None:
            self._answer(exchange, done.result())
        elif isinstance(error, ServerError):
            self._answer_error(exchange, error)
        else:
            log.error("unexpected error serving %s %s: %r", exchange.method, exchange.path, error)
            self._answer_error(exchange, ServerError(f"{type(error).__name__}: {error}"))

    def _answer_error(self, exchange: _Exchange, error: ServerError) -> None:
        answer = exchange.route.errors(error)
        if error.headers:
            # What the status means in HTTP, whatever the dialect: a 401's challenge, say.
            headers = (*answer.headers, *error.headers.items())
            answer = Response(answer.status, answer.body, answer.content_type, headers, answer.phrase)
        self._answer(exchange, answer)

    def _answer(self, exchange: _Exchange, answer: Answer | Streamed) -> None:
        policy = self.door.policy
        try:
            lines = head(answer, policy.headers, policy.header_lines, exchange.request_id)
        except ValueError as exc:
            if getattr(answer, "attach", None) is not None:
                answer.cancel()  # type: ignore[union-attr]
            self._answer_error(exchange, ServerError(f"The handler set an invalid {exc}"))
            return
        if getattr(answer, "attach", None) is not None:
            self._stream(exchange, answer, lines)  # type: ignore[arg-type]
            return
        self._send(exchange, answer.status, lines, answer.body)  # type: ignore[union-attr]

    def _stream(self, exchange: _Exchange, answer: Streamed, lines: bytes) -> None:
        """Write a streamed answer's head now and its pieces as they come: chunked, or for an
        HTTP/1.0 client as plain bytes ended by closing the connection. The next pipelined
        request waits until the stream ends."""
        transport = self.transport
        if transport is None or transport.is_closing() or exchange.method == "HEAD":
            if transport is not None and not transport.is_closing():
                transport.write(lines + self.door.policy.date_line() + b"transfer-encoding: chunked\r\n\r\n")
            answer.cancel()
            self._stream_ended(exchange, answer.status)
            return
        chunked = not exchange.http10
        framing = b"transfer-encoding: chunked\r\n" if chunked else b""
        close = not chunked or not exchange.keep_alive or self._closing or self.door.closing
        transport.write(
            lines + self.door.policy.date_line() + framing + (b"connection: close\r\n\r\n" if close else b"\r\n")
        )
        if close:
            self._closing = True
        exchange.stream = _StreamWriter(self, exchange, answer, chunked)
        answer.attach(exchange.stream)

    def _stream_ended(self, exchange: _Exchange, status: int) -> None:
        exchange.stream = None
        if exchange.answered:
            return
        exchange.answered = True
        self._finished(exchange, status)
        if self._queue and self._queue[0] is exchange:
            self._queue.popleft()
        self._advance()

    def _send(self, exchange: _Exchange, status: int, lines: bytes, body: bytes) -> None:
        if exchange.answered:
            return
        exchange.answered = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            close = not exchange.keep_alive or self._closing or self.door.closing
            if not exchange.complete and not exchange.body_seen and exchange.header(b"expect") is not None:
                # Answered before a body the client holds back until told to continue: whether it
                # sends it now is up to the client, so the next bytes may not be a request.
                close = True
            transport.write(
                b"".join((
                    lines, self.door.policy.date_line(), b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n" if close else b"\r\n",
                    b"" if exchange.method == "HEAD" else body,
                ))
            )  # fmt: skip
            if close:
                self._closing = True
                transport.close()
        self._finished(exchange, status)
        if self._queue and self._queue[0] is exchange:
            self._queue.popleft()
        self._advance()

    def _finished(self, exchange: _Exchange, status: int) -> None:
        self.door.policy.answered(
            self.client, exchange.method, exchange.path, status, exchange.received, exchange.request_id
        )
        if exchange.on_answered is not None:
            exchange.on_answered(status)

    def _client_gone(self, exchange: _Exchange) -> None:
        """The connection closed before ``exchange`` was answered."""
        if exchange.answered:
            return
        if exchange.stream is not None:
            exchange.stream.abandon()
            return
        pending = exchange.pending
        if pending is None:
            exchange.answered = True
            self._finished(exchange, 499)
        elif not isinstance(pending, asyncio.Task):
            # A queued job: cancelled, so that no worker runs it (_on_result records it).
            pending.cancel()
        # A task runs on (a registration, say); its status is recorded when it ends.

    def _refuse(self, message: str) -> None:
        """Answer what is not HTTP (or over the head caps) with TorchServe's JSON 400, and close."""
        self._refusal = INVALID
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        policy = self.door.policy
        policy.refused(_REASONS.get(message, "invalid"))
        answer = torchserve_error(BadRequest(message))
        lines = head(answer, policy.headers, policy.header_lines, policy.request_id())
        body = answer.body
        transport.write(lines + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self._closing = True
        transport.close()

    # -- timeouts --------------------------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.call_later(delay, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self.loop.time()
        door = self.door
        if self._incomplete:
            if self._read_paused:
                # The server stopped reading (pipelined requests wait their turn), not the client.
                self._arm(door.read_timeout)
                return
            deadline, reason = self._last_read + door.read_timeout, "read_timeout"
            if self._in_head:
                due = self._phase_started + door.head_timeout
                if due < deadline:
                    deadline, reason = due, "head_timeout"
            elif door.min_body_rate:
                # Each byte buys 1/min_body_rate seconds beyond the grace.
                due = self._phase_started + door.head_timeout + self._body_bytes / door.min_body_rate
                if due < deadline:
                    deadline, reason = due, "body_too_slow"
            if now < deadline:
                self._arm(deadline - now)
                return
            self.close(reason)
        elif not self._queue:
            idle = now - self._idle_since
            if idle < door.keep_alive:
                self._arm(door.keep_alive - idle)
                return
            transport.close()
        # Otherwise a request is being answered: the timer is armed again when it is.
