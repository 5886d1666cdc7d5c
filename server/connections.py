"""HTTP connections: what a client may send before its request reaches an app.

uvicorn's httptools protocol keeps a request's head in memory however long it grows, never
closes a connection that stalls before its request is complete (or never sends one), and
answers a request it cannot parse in text/plain. This subclass caps the head, closes stalled
connections after ``read_timeout`` seconds of silence, and answers TorchServe's JSON 400
(``Invalid HTTP message.``).

On the inference port it also serves predictions itself (``predictions.Prediction``) instead of
starting an ASGI task for them; every other request is uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
import uuid
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import BadRequest
from .http import NO_CACHE_LINES
from .predictions import Prediction, PredictionService, prediction_target

log = logging.getLogger("marserve.http")

# The request line and headers together; cookies and tokens fit with room to spare.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
INVALID = "Invalid HTTP message."
HEAD_TOO_LARGE = f"Invalid HTTP message: the request line and headers exceed {MAX_HEAD_BYTES} bytes"
TOO_MANY_HEADERS = f"Invalid HTTP message: more than {MAX_HEADERS} header fields"



class _Refused(Exception):
    pass


class HttpProtocol(HttpToolsProtocol):
    """One client connection, with limits on the request head and on stalling.

    Every request passes through here, so the checks are per chunk and per request head, never
    per header, and the stall timer is armed once and pushed back lazily rather than re-armed on
    every read.
    """

    def __init__(
        self, *args: Any, read_timeout: float, predictions: PredictionService | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.predictions = predictions
        self._prediction: Prediction | None = None  # the one whose turn it is
        self._default_headers: tuple[object, bytes] = (None, b"")
        # True while the client owes the rest of a request: from the connection's start or a
        # request's first byte until its last. Between requests uvicorn's keep-alive timeout rules.
        self._incomplete = True
        self._in_head = True
        self._received_in_head = 0  # raw bytes, counted as they arrive
        self._last_read = 0.0
        self._refusal = INVALID
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._last_read = self.loop.time()
        self._arm_read_timer(self.read_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if self._prediction is not None:
            self._prediction.client_gone()
        if isinstance(self.cycle, Prediction):
            self.cycle = None  # type: ignore[assignment]  # uvicorn would signal it as an ASGI cycle
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        if self._in_head:
            self._received_in_head += len(data)
        super().data_received(data)
        # httptools holds an unfinished header line in memory, unseen by the callbacks: a head
        # still unfinished after more bytes than the cap is too large, whatever its shape.
        if self._in_head and self._received_in_head > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._incomplete = True
        if self._read_timer is None:
            self._arm_read_timer(self.read_timeout)

    def on_headers_complete(self) -> None:
        # A head that arrived in one read is only seen whole here; one read is at most the
        # event loop's read buffer, so what was parsed before this check is bounded too.
        headers = self.headers
        if len(headers) > MAX_HEADERS:
            self._refusal = TOO_MANY_HEADERS
            raise _Refused  # through the parser, which uvicorn answers with send_400_response
        if len(self.url) + sum(len(name) + len(value) + 4 for name, value in headers) > MAX_HEAD_BYTES:
            self._refusal = HEAD_TOO_LARGE
            raise _Refused
        self._in_head = False
        prediction = self._prediction_for_head() if self.predictions is not None else None
        if prediction is None:
            super().on_headers_complete()
            return
        # As uvicorn does for its own requests: one at a time, later pipelined ones wait their turn.
        previous = self.cycle
        self.cycle = prediction  # type: ignore[assignment]
        if previous is None or previous.response_complete:
            self._start(prediction)
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((prediction, None))  # type: ignore[arg-type]

    def _prediction_for_head(self) -> Prediction | None:
        assert self.predictions is not None
        method = self.parser.get_method()
        if method == b"OPTIONS" or self.parser.should_upgrade():
            return None
        # The path exactly as uvicorn puts it in an ASGI scope.
        path = httptools.parse_url(self.url).path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        target = prediction_target(path)
        if target is None:
            return None
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        return Prediction(
            self.predictions, self, method.decode("ascii"), path, target, self.headers, self.client,
            self.expect_100_continue, keep_alive,
        )  # fmt: skip

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn starts the next pipelined request here, which may be a prediction.
        if isinstance(cycle, Prediction):
            self._start(cycle)
        else:
            super()._start_asgi_task(cycle, app)

    def _start(self, prediction: Prediction) -> None:
        self._prediction = prediction
        prediction.start()

    def on_body(self, body: bytes) -> None:
        if isinstance(self.cycle, Prediction):
            self.cycle.add_body(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._incomplete = False
        self._in_head = True
        self._received_in_head = 0
        if isinstance(self.cycle, Prediction):
            self.cycle.body_complete()
        else:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        self._prediction = None
        super().on_response_complete()

    def default_headers(self) -> bytes:
        """uvicorn's headers for every response (the date), as lines; uvicorn renews them each second."""
        headers = self.server_state.default_headers
        if headers is not self._default_headers[0]:
            self._default_headers = (headers, b"".join(b"%s: %s\r\n" % pair for pair in headers))
        return self._default_headers[1]

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a request its parser refused; TorchServe answers it in JSON.
        self._refuse(self._refusal)

    def _refuse(self, message: str) -> None:
        body = BadRequest(message).body()
        head = (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            + b"content-length: %d\r\n" % len(body)
            + NO_CACHE_LINES
            + f"x-request-id: {uuid.uuid4()}\r\n".encode()
            + b"connection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()

    def _arm_read_timer(self, delay: float) -> None:
        self._read_timer = self.loop.call_later(delay, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or not self._incomplete:
            return  # gone, or between requests: on_message_begin arms the timer again
        silent = self.loop.time() - self._last_read
        if silent < self.read_timeout or self.flow.read_paused:
            # Data came meanwhile, or the server stopped reading (the app has not taken the
            # body yet), not the client: look again when the client has had its full time.
            self._arm_read_timer(self.read_timeout - silent if silent < self.read_timeout else self.read_timeout)
            return
        log.info("closing a connection from %s: no request data for %g s", self.client, self.read_timeout)
        self.transport.close()
