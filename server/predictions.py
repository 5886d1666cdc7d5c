"""Predictions, the inference API's hot path, answered straight from the HTTP connection.

/predictions and /explanations are what marserve is for, so they skip ASGI: the connection
(``connections.HttpProtocol``) hands each one's head and body to a ``Prediction``, which queues the
job and, when the worker's reply arrives, writes the whole response in one send. There is no task
per request, no ASGI messages and no per-header Python on the way out; the profile of an echo
request was two-thirds ASGI plumbing before. Everything else on the inference port (ping, API
descriptions, OPTIONS, unknown paths) is an ordinary Starlette app (``inference_api``).
"""

from __future__ import annotations

import asyncio
import http
import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from .http.access_log import AccessLog
from .http.auth import INFERENCE, REFUSED, TokenAuth
from .models.batching import Job, Reply
from .errors import PayloadTooLarge, ServerError, Unauthorized
from .http.forms import request_params
from .http import NO_CACHE, NO_CACHE_LINES, body_too_large, check_content_length
from .metrics.recording import Metrics
from .models.registry import ModelRegistry

log = logging.getLogger("marserve.inference")

# Framing is ours to set: a handler's own copies of these would let its output forge a response.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_JSON = b"content-type: application/json\r\n"


class Connection(Protocol):
    """What a prediction needs from the connection it arrived on."""

    transport: asyncio.Transport

    def default_headers(self) -> bytes: ...

    def on_response_complete(self) -> None: ...


class RequestIds:
    """UUID-shaped request ids: a random prefix per server run and a counter.

    Unique within a run and unlikely to repeat across runs, for a fraction of ``uuid4``'s cost
    (no system call, no UUID object). They name requests in logs; nothing relies on them being
    unguessable.
    """

    def __init__(self) -> None:
        prefix = secrets.token_hex(10)
        self._prefix = f"{prefix[:8]}-{prefix[8:12]}-4{prefix[12:15]}-{'89ab'[int(prefix[15], 16) % 4]}{prefix[16:19]}-"
        self._count = itertools.count(secrets.randbits(40))

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFFFFFF:012x}"


class PredictionService:
    """What every prediction needs: the models, the body limit, tokens, metrics and the access log."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        access_log: AccessLog,
        auth: TokenAuth | None,
        max_request_size: int,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.access_log = access_log
        self.auth = auth
        self.limit = max_request_size
        self.request_id: Callable[[], str] = RequestIds()


def prediction_target(path: str) -> tuple[str, str, str | None, str] | None:
    """``(kind, model, version, rest)`` for /predictions and /explanations paths, else None.

    A trailing slash is ignored, as in TorchServe; segments after the version become the
    ``url_path`` header handlers can read.
    """
    if not path.startswith(("/predictions/", "/explanations/")):
        return None
    parts = path.split("/")
    if not parts[2]:
        return None
    version = parts[3] if len(parts) > 3 and parts[3] else None
    return parts[1], parts[2], version, "/".join(parts[4:]).strip("/")


class Prediction:
    """One prediction request on one connection, from its head to its response.

    The connection feeds the body (``add_body``, ``body_complete``) and says when the request's
    turn has come (``start``: pipelined requests wait for the ones before them). The job is queued
    once both have happened. ``response_complete``, ``keep_alive`` and ``disconnected`` are the
    three attributes uvicorn's protocol reads on its current request.
    """

    __slots__ = (
        "service", "connection", "method", "path", "target", "headers", "client", "expect_continue",
        "keep_alive", "response_complete", "disconnected", "request_id", "received",
        "_chunks", "_size", "_complete", "_started", "_refusal", "_job", "_model",
    )  # fmt: skip

    def __init__(
        self,
        service: PredictionService,
        connection: Connection,
        method: str,
        path: str,
        target: tuple[str, str, str | None, str],
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        expect_continue: bool,
        keep_alive: bool,
    ) -> None:
        self.service = service
        self.connection = connection
        self.method = method
        self.path = path
        self.target = target
        self.headers = headers
        self.client = client
        self.expect_continue = expect_continue
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.received = time.perf_counter()
        self.request_id = service.request_id()
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False
        self._started = False
        self._job: Job | None = None
        self._model = None
        # Decided from the head alone: answered as soon as it is this request's turn.
        self._refusal = self._check_head()

    def _check_head(self) -> ServerError | None:
        try:
            check_content_length(self.headers, self.service.limit)
        except PayloadTooLarge as error:
            return error
        auth = self.service.auth
        if auth is not None and not auth.allows_request(INFERENCE, self.headers):
            return Unauthorized(REFUSED)
        return None

    # -- fed by the connection -------------------------------------------------------------------

    def add_body(self, chunk: bytes) -> None:
        if self.response_complete:
            return  # refused already: the rest of the body is read and dropped
        self._size += len(chunk)
        if self._size > self.service.limit:
            self._chunks.clear()
            self._refusal = body_too_large(self.service.limit)
            if self._started:
                self._fail(self._refusal)
            return
        self._chunks.append(chunk)

    def body_complete(self) -> None:
        self._complete = True
        if self._started and not self.response_complete:
            self._submit()

    def start(self) -> None:
        self._started = True
        if self._refusal is not None:
            self._fail(self._refusal)
        elif self._complete:
            self._submit()
        elif self.expect_continue:
            self.connection.transport.write(_CONTINUE)

    def client_gone(self) -> None:
        """The connection closed: a queued job is cancelled so that no worker runs it."""
        self.disconnected = True
        if self.response_complete:
            return
        if self._job is not None and not self._job.future.done():
            self._job.future.cancel()  # _on_reply records it
        elif self._job is None:
            # Nobody reads this response; the status only shows in the access log and metrics.
            self._finish(499)

    # -- the job ---------------------------------------------------------------------------------

    def _submit(self) -> None:
        kind, name, version, rest = self.target
        try:
            model = self.service.registry.get(name, version)
            body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks = []
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.headers]
            content_type = next((v for k, v in headers if k == "content-type"), None)
            headers.append(("explain", "True" if kind == "explanations" else "False"))
            headers.append(("url_path", rest))
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self._model = model
            self._job = Job(self.request_id, headers, request_params(content_type, body), future, self.received)
            model.submit(self._job, versioned=version is not None)
        except ServerError as error:
            self._fail(error)
            return
        except Exception as exc:  # noqa: BLE001 - a bug must still answer, in the API's format
            log.exception("unexpected error serving %s", self.path)
            self._fail(ServerError(f"{type(exc).__name__}: {exc}"))
            return
        future.add_done_callback(self._on_reply)

    def _on_reply(self, future: asyncio.Future[Reply]) -> None:
        if future.cancelled():
            self._finish(499)
            return
        error = future.exception()
        if error is None:
            self._reply(future.result())
        elif isinstance(error, ServerError):
            self._fail(error)
        else:
            log.error("unexpected error serving %s: %r", self.path, error)
            self._fail(ServerError(f"{type(error).__name__}: {error}"))

    # -- the response ----------------------------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        try:
            status_line = _status_line(reply.status, reply.phrase)
            if reply.headers:
                head = _handler_head(reply, self.request_id)
            else:
                # The common case: only a content type (or none) to add to our own headers.
                head = self._own_head()
                if reply.content_type:
                    head += _header_line("content-type", reply.content_type)
        except ValueError as exc:
            self._fail(ServerError(f"The handler set an invalid {exc}"))
            return
        self._send(reply.status, status_line, head, reply.body)

    def _fail(self, error: ServerError) -> None:
        head = self._own_head() + _JSON
        head += b"".join(_header_line(k.lower(), v) for k, v in error.headers.items())
        self._send(error.status_code, _status_line(error.status_code), head, error.body())

    def _own_head(self) -> bytes:
        return NO_CACHE_LINES + b"x-request-id: %s\r\n" % self.request_id.encode()

    def _send(self, status: int, status_line: bytes, head: bytes, body: bytes) -> None:
        if self.response_complete:
            return
        connection = self.connection
        if not self.disconnected:
            transport = connection.transport
            close = b"" if self.keep_alive else b"connection: close\r\n"
            transport.write(
                b"".join((
                    status_line, connection.default_headers(), head,
                    b"content-length: %d\r\n" % len(body), close, b"\r\n",
                    b"" if self.method == "HEAD" else body,
                ))
            )  # fmt: skip
            if not self.keep_alive:
                transport.close()
        self._finish(status)
        if not self.disconnected:
            connection.on_response_complete()

    def _finish(self, status: int) -> None:
        self.response_complete = True
        service = self.service
        service.metrics.response(status)
        job = self._job
        if job is not None and self._model is not None:
            # TorchServe counts every request that reached its queue, even one refused there.
            queued = job.dispatched - self.received if job.dispatched else 0.0
            _, name, version, _ = self.target
            service.metrics.inference(name, version, self._model.version, time.perf_counter() - self.received, queued)
        service.access_log.record(
            {"client": self.client, "method": self.method, "path": self.path}, status, self.received, self.request_id
        )


def _handler_head(reply: Reply, request_id: str) -> bytes:
    """Our headers, with the handler's own replacing ours of the same name (Cache-Control, say)."""
    merged = {k.lower(): v for k, v in NO_CACHE.items()}
    for name, value in reply.headers:
        merged[name.lower()] = value
    merged["x-request-id"] = request_id
    if reply.content_type:
        # Sent as the handler set it (TorchServe adds no charset either).
        merged["content-type"] = reply.content_type
    return b"".join(_header_line(name, value) for name, value in merged.items() if name not in _FRAMING)


def _header_line(name: str, value: str) -> bytes:
    """``name: value`` as a head line; ValueError naming the header if it is not valid HTTP."""
    if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
        raise ValueError(f"response header: {name!r}")
    try:
        return f"{name}: {value}\r\n".encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"response header: {name!r}") from None


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int, phrase: str = "") -> bytes:
    """The response's first line, with the handler's reason phrase if it set one (as TorchServe
    sends it), else the standard one; ValueError if the phrase is not valid HTTP."""
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
