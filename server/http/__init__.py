"""HTTP pieces shared by the three APIs: JSON bodies, error rendering and body limits."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any, Protocol

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access_log import AccessLog
from ..errors import MethodNotAllowed, NotFound, PayloadTooLarge, ServerError

log = logging.getLogger("marserve.http")


class StatusCounter(Protocol):
    def response(self, status: int) -> None: ...


class ObserveResponses:
    """Counts each response's status class and writes its access-log line (every port does both)."""

    def __init__(self, app: ASGIApp, metrics: StatusCounter, access_log: AccessLog) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(message["status"])
                request_id = dict(message.get("headers", ())).get(b"x-request-id", b"-").decode()
                self.access_log.record(scope, message["status"], started, request_id)
            await send(message)

        await self.app(scope, receive, observing_send)


# TorchServe sends these on every response; clients and proxies must not cache predictions.
NO_CACHE = {
    "Cache-Control": "no-cache; no-store, must-revalidate, private",
    "Pragma": "no-cache",
    "Expires": "Thu, 01 Jan 1970 00:00:00 UTC",
}
# The same, as the lines of a response head written by hand (connections, predictions).
NO_CACHE_LINES = b"".join(f"{k.lower()}: {v}\r\n".encode() for k, v in NO_CACHE.items())


def json_response(payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """TorchServe's JSON: 2-space indent and a trailing newline, with a request id."""
    body = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    all_headers = {**NO_CACHE, "x-request-id": str(uuid.uuid4()), **(headers or {})}
    return Response(body, status_code=status_code, media_type="application/json", headers=all_headers)


def status_response(message: str, status_code: int = 200) -> Response:
    return json_response({"status": message}, status_code)


def error_response(error: ServerError) -> Response:
    return json_response(error.to_dict(), error.status_code, error.headers)


async def render_server_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServerError)
    return error_response(exc)


async def render_http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own 404 and 405 (unknown path, wrong method) in TorchServe's shape.
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed())
    if exc.status_code == 404:
        return error_response(NotFound())
    return error_response(ServerError(str(exc.detail), exc.status_code))


async def render_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(ServerError(f"{type(exc).__name__}: {exc}"))


EXCEPTION_HANDLERS = {
    ServerError: render_server_error,
    HTTPException: render_http_exception,
    Exception: render_unexpected,
}


def check_content_length(headers: Iterable[tuple[bytes, bytes]], limit: int) -> None:
    """413 for a request that declares a body over ``limit`` bytes, before any of it is read."""
    for key, value in headers:
        if key == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"Request body of {int(value)} bytes exceeds max_request_size ({limit})")


def body_too_large(limit: int) -> PayloadTooLarge:
    """The error for a body (chunked, or longer than declared) that grew past ``limit`` bytes."""
    return PayloadTooLarge(f"Request body exceeds max_request_size ({limit})")


class LimitRequestBody:
    """``max_request_size`` on every route of an app, as TorchServe applies it on every port.

    A declared Content-Length over the limit is answered 413 before the body is read; any other
    body fails the app's read (413 through the app's error handlers) as soon as it passes the
    limit, so no route ever holds more than ``limit`` bytes of it.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            check_content_length(scope["headers"], self.limit)
        except PayloadTooLarge as error:
            await error_response(error)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise body_too_large(self.limit)
            return message

        await self.app(scope, limited_receive, send)
