"""The inference API (port 8080): /ping, /predictions and /explanations."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .access_log import AccessLog
from .batching import Job, Reply
from .errors import ServerError
from .forms import request_params
from .http import (
    EXCEPTION_HANDLERS,
    NO_CACHE,
    LimitRequestBody,
    ObserveResponses,
    body_too_large,
    check_content_length,
    json_response,
)
from .metrics import Metrics
from .openapi import for_model, inference_openapi
from .registry import ModelRegistry

log = logging.getLogger("marserve.inference")

class InferenceApp:
    """The ASGI app of port 8080.

    Predictions are the product's hot path, so they take a lean route straight on ASGI: no
    middleware stack, router or Request/Response objects per call. Everything else (ping, API
    descriptions, unknown paths) goes through an ordinary Starlette app.
    """

    def __init__(self, registry: ModelRegistry, metrics: Metrics, access_log: AccessLog) -> None:
        self.registry = registry
        self.metrics = metrics
        self.access_log = access_log
        self.limit = registry.config.max_request_size
        fallback = Starlette(routes=_routes(registry), exception_handlers=EXCEPTION_HANDLERS)
        self.fallback = ObserveResponses(LimitRequestBody(fallback, self.limit), metrics, access_log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            target = prediction_target(scope["path"])
            if target is not None:
                await self.predict(scope, receive, send, *target)
                return
        await self.fallback(scope, receive, send)

    async def predict(
        self, scope: Scope, receive: Receive, send: Send, kind: str, name: str, version: str | None, rest: str
    ) -> None:
        received = time.perf_counter()
        request_id = str(uuid.uuid4())
        job = None
        try:
            model = self.registry.get(name, version)
            body = await _read_body(scope, receive, self.limit)
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            content_type = next((v for k, v in headers if k == "content-type"), None)
            headers.append(("explain", "True" if kind == "explanations" else "False"))
            headers.append(("url_path", rest))
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            job = Job(request_id, headers, request_params(content_type, body), future, received)
            model.submit(job, versioned=version is not None)
            reply = await _await_reply(receive, future)
        except ServerError as error:
            status, response_headers, payload = error.status_code, json_headers(request_id), error.body()
        except Exception as exc:  # noqa: BLE001 - a bug must still answer, in the API's format
            log.exception("unexpected error serving %s", scope["path"])
            error = ServerError(f"{type(exc).__name__}: {exc}")
            status, response_headers, payload = 500, json_headers(request_id), error.body()
        else:
            status, response_headers, payload = reply.status, reply_headers(reply, request_id), reply.body
        response_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})
        self.metrics.response(status)
        if job is not None:
            # TorchServe counts every request that reached its queue, even one refused there.
            queued = job.dispatched - received if job.dispatched else 0.0
            self.metrics.inference(name, version, model.version, time.perf_counter() - received, queued)
        self.access_log.record(scope, status, received, request_id)


def prediction_target(path: str) -> tuple[str, str, str | None, str] | None:
    """``(kind, model, version, rest)`` for /predictions and /explanations paths, else None.

    A trailing slash is ignored, as in TorchServe; segments after the version become the
    ``url_path`` header handlers can read.
    """
    parts = path.split("/")
    if len(parts) < 3 or parts[1] not in ("predictions", "explanations") or not parts[2]:
        return None
    version = parts[3] if len(parts) > 3 and parts[3] else None
    return parts[1], parts[2], version, "/".join(parts[4:]).strip("/")


def _routes(registry: ModelRegistry) -> list[Route]:
    async def ping(request: Request) -> Response:
        return json_response({"status": "Healthy"})

    async def api_description(request: Request) -> Response:
        return json_response(inference_openapi())

    async def model_description(request: Request) -> Response:
        # Reached only by OPTIONS: every other method on these paths is a prediction.
        name = request.path_params["model_name"]
        registry.get(name)
        return json_response(for_model(inference_openapi(), name, ("/predictions/", "/explanations/")))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

    def route(path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> list[Route]:
        # TorchServe ignores a trailing slash; Starlette would answer it with a redirect.
        return [Route(path, endpoint, methods=methods), Route(f"{path}/", endpoint, methods=methods)]

    return [
        Route("/", api_description, methods=["OPTIONS"]),
        *route("/api-description", api_description),
        *route("/ping", ping),
        Route("/predictions/{model_name}{rest:path}", model_description, methods=["OPTIONS"]),
        Route("/explanations/{model_name}{rest:path}", model_description, methods=["OPTIONS"]),
    ]


_NO_CACHE_RAW = [(k.lower().encode(), v.encode()) for k, v in NO_CACHE.items()]


def json_headers(request_id: str) -> list[tuple[bytes, bytes]]:
    return [*_NO_CACHE_RAW, (b"x-request-id", request_id.encode()), (b"content-type", b"application/json")]


def reply_headers(reply: Reply, request_id: str) -> list[tuple[bytes, bytes]]:
    if not reply.headers:
        headers = [*_NO_CACHE_RAW, (b"x-request-id", request_id.encode())]
    else:
        # A handler's own Cache-Control or similar replaces ours instead of doubling it.
        merged = {k.lower(): v for k, v in (*NO_CACHE.items(), *reply.headers)}
        merged["x-request-id"] = request_id
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in merged.items()]
    if reply.content_type:
        # Sent as the handler set it (TorchServe adds no charset either).
        headers.append((b"content-type", reply.content_type.encode("latin-1")))
    return headers


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing (413) anything over ``limit`` bytes before buffering it."""
    check_content_length(scope["headers"], limit)
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("Client disconnected before sending the whole request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _await_reply(receive: Receive, future: asyncio.Future[Reply]) -> Reply:
    """Wait for the reply; if the client disconnects first, cancel the job so no worker runs it."""
    # The body is fully read, so the next receive() returns only when the client goes away.
    watcher = asyncio.ensure_future(receive())
    watcher.add_done_callback(lambda _: future.cancel())
    try:
        return await future
    except asyncio.CancelledError:
        if not watcher.done():
            raise  # the server itself is cancelling this request
        raise ClientGone("Client disconnected before the response was ready") from None
    finally:
        watcher.cancel()


class ClientGone(ServerError):
    # Nobody reads this response; the status only shows in the access log.
    status_code = 499
